"""Progress over the whole training run (every epoch's iterations), with the time left."""

from __future__ import annotations

import logging
import time

from ignite.engine import Engine, Events


class RunProgress:
    """A run-level progress bar with ETA (tqdm) on a terminal, else a plain line now and then.

    The bar counts every iteration of the run (``max_epochs x epoch_length``, from where a resumed
    run starts) and shows the epoch and the last loss; tqdm estimates the time left. Without a
    terminal (``bar`` false: a log file, a scheduler's output) a line goes to the log at the end of
    the first epoch, then at most every ``every_s`` seconds, and at the end of the last epoch:
    ``training: epoch 3/20, iteration 150/1000 (15%), 42 s, about 238 s left, loss 0.41``.
    """

    def __init__(self, bar: bool = True, every_s: float = 30.0):
        self.bar, self.every_s = bool(bar), float(every_s)
        self.logger = logging.getLogger("scripts.progress")
        self._tqdm = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        for event in (Events.COMPLETED, Events.TERMINATE, Events.EXCEPTION_RAISED):
            engine.add_event_handler(event, self.close)

    def _total(self, engine: Engine) -> int:
        return int(engine.state.max_epochs) * int(engine.state.epoch_length)

    def started(self, engine: Engine) -> None:
        self.start, self.first, self.last_line = time.perf_counter(), engine.state.iteration, None
        if self.bar:
            from tqdm import tqdm

            self._tqdm = tqdm(
                total=self._total(engine),
                initial=engine.state.iteration,
                desc="training",
                unit="it",
                dynamic_ncols=True,
            )

    @staticmethod
    def _loss(engine: Engine) -> float | None:
        output = engine.state.output
        output = output[0] if isinstance(output, list) and output else output
        return output.get("loss") if isinstance(output, dict) else None

    def iteration_completed(self, engine: Engine) -> None:
        if self._tqdm is not None:
            self._tqdm.update(1)
            if engine.state.iteration % 10 == 0:
                loss = self._loss(engine)
                postfix = f"epoch {engine.state.epoch}/{engine.state.max_epochs}"
                self._tqdm.set_postfix_str(postfix + (f", loss {loss:.4g}" if loss is not None else ""))

    def epoch_completed(self, engine: Engine) -> None:
        if self._tqdm is not None:
            return
        now = time.perf_counter()
        last = engine.state.epoch >= engine.state.max_epochs
        if not (self.last_line is None or last or now - self.last_line >= self.every_s):
            return
        self.last_line = now
        done, total = engine.state.iteration, self._total(engine)
        elapsed = now - self.start
        rate = elapsed / max(done - self.first, 1)
        loss = self._loss(engine)
        self.logger.info(
            "training: epoch %d/%d, iteration %d/%d (%d%%), %.0f s, about %.0f s left%s",
            engine.state.epoch,
            engine.state.max_epochs,
            done,
            total,
            100 * done // max(total, 1),
            elapsed,
            rate * (total - done),
            f", loss {loss:.4g}" if loss is not None else "",
        )

    def close(self, engine: Engine, *args) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
