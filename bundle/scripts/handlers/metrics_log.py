"""One JSON line per logged iteration: epoch, iteration, stage, gamma and every loss term."""

from __future__ import annotations

import json
import os
import time

from ignite.engine import Engine, Events


class MetricsLog:
    """Append ``engine.state.output`` (a dict of floats, or a list holding one) to a JSONL file every
    ``interval`` iterations, and at the end of every epoch (so the log holds each epoch's last iteration).

    Lines: {"epoch", "iteration", "stage", "gamma", "time", <every loss term>}; ``time`` is the
    wall-clock time (seconds since the epoch) the iteration completed, so the seconds per iteration
    of a run can be read from the log. Only rank 0 writes when running distributed.
    """

    def __init__(self, path: str, interval: int = 1):
        self.path, self.interval = path, max(int(interval), 1)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_end)

    def epoch_end(self, engine: Engine) -> None:
        if engine.state.iteration % self.interval:  # not logged at its iteration
            self(engine)

    def __call__(self, engine: Engine) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        output = engine.state.output
        if isinstance(output, list):  # MONAI's decollated form: [{"loss": ..., <every term>}]
            output = output[0]
        if not isinstance(output, dict):
            output = {"loss": output}
        record = {
            "epoch": engine.state.epoch,
            "iteration": engine.state.iteration,
            "stage": int(getattr(engine.state, "stage", 0)),
            "gamma": float(getattr(engine.state, "gamma", 0.0)),
            "time": round(time.time(), 3),
        }
        record.update({k: float(v) for k, v in output.items() if k != "loss"})
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
