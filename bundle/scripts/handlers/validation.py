"""Validation around MONAI's ValidationHandler: the last weights validated too, and a metrics log."""

from __future__ import annotations

import json
import os

from ignite.engine import Engine, Events


class FinalValidation:
    """Validate the weights training ends with, unless the last scheduled validation saw them.

    MONAI's ValidationHandler validates every ``interval`` epochs; a run whose epochs are not a
    multiple of it, or that a time limit stops inside an epoch, would otherwise keep its last
    updates out of the choice of the best model. Attach to the trainer (after ValidationHandler).
    """

    def __init__(self, validator: Engine):
        self.validator = validator
        self.validated_at: int | None = None

    def attach(self, engine: Engine) -> None:
        self.validator.add_event_handler(
            Events.COMPLETED, lambda _: setattr(self, "validated_at", engine.state.iteration)
        )
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.validated_at != engine.state.iteration:
            self.validator.run(engine.state.epoch)


class ValidationLog:
    """Append one JSON line per validation to ``path``: the training epoch, every metric, the best.

    Lines: {"epoch", <every metric, e.g. val_psnr, val_psnr_c>, "key_metric", "best_metric",
    "best_metric_epoch", "seconds" (the validation's wall time)}. Attach to the evaluator; only
    rank 0 writes when running distributed.
    """

    def __init__(self, path: str):
        self.path = path

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        record = {"epoch": engine.state.epoch}
        record.update({k: float(v) for k, v in engine.state.metrics.items()})
        record.update(
            {
                "key_metric": engine.state.key_metric_name,
                "best_metric": float(engine.state.best_metric),
                "best_metric_epoch": int(engine.state.best_metric_epoch),
                "seconds": round(float(engine.state.times.get(Events.EPOCH_COMPLETED.name) or 0.0), 3),
            }
        )
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
