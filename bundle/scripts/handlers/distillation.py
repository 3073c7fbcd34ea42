"""The incremental schedule of cross-view distillation, as an Ignite handler."""

from __future__ import annotations

import logging

from ignite.engine import Engine, Events


class DistillationSchedule:
    """Switch distillation levels on at configured epochs; set ``engine.state.stage`` and ``.gamma``.

    Level n (1-based) is active from the epoch after ``level_start_epochs[n-1]`` epochs have
    completed, so ``[0, 0]`` trains every level from the start (as the reference code) and
    ``[2, 5]`` trains internal learning alone for 2 epochs, adds level 1, and level 2 after 5.
    ``engine.state.stage`` is the number of active levels (0 = internal learning only).

    Args:
        level_start_epochs: one start per level; its length is N, the number of levels.
        gamma: the fraction of best-agreeing positions distilled (``engine.state.gamma``).
        active: whether the configuration distils at all (G_a built, ``lambda_cmd`` > 0, a view
            in ``cmd_views``); when not, the stages are still set but the log says so.
    """

    def __init__(
        self, level_start_epochs: list[int], gamma: float = 0.25, name: str | None = None, active: bool = True
    ):
        if any(b < a for a, b in zip(level_start_epochs, level_start_epochs[1:])):
            raise ValueError(f"level_start_epochs must be non-decreasing, got {level_start_epochs}")
        self.level_start_epochs = [int(e) for e in level_start_epochs]
        self.gamma = float(gamma)
        self.active = bool(active)
        self.logger = logging.getLogger(name or __name__)

    def stage_at(self, completed_epochs: int) -> int:
        return sum(1 for start in self.level_start_epochs if completed_epochs >= start)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        # state.epoch is already the 1-based number of the starting epoch at EPOCH_STARTED
        completed = max(engine.state.epoch - 1, 0) if engine.state.epoch else 0
        stage = self.stage_at(completed)
        if getattr(engine.state, "stage", None) != stage:
            self.logger.info(
                f"distillation stage {stage} (levels active: {stage}) from epoch {completed + 1}"
                if self.active
                else "no distillation in this configuration (no axial view, lambda_cmd 0 or no cmd_views)"
            )
        engine.state.stage = stage
        engine.state.gamma = self.gamma
