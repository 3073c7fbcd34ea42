"""Distributed training: every rank draws its own patches."""

from __future__ import annotations

import logging

from ignite.engine import Engine, Events
from monai.utils import set_determinism


class RankSeed:
    """Seed each rank's random streams at every epoch start with ``seed + rank + world_size * epoch``.

    Under DistributedDataParallel the processes must draw different patches, or every rank computes
    the same gradient. Seeding at EPOCH_STARTED, before the epoch's first batch is drawn, also keeps
    the ranks apart after a resume (which restores rank 0's saved random states on every rank) and
    makes a resumed run draw what an uninterrupted one would. Seeds torch, numpy and Python
    (MONAI's ``set_determinism``) and the random transforms of ``transforms``. One process: rank 0
    of 1.
    """

    def __init__(self, seed: int, transforms=None, name: str | None = None):
        self.seed, self.transforms = int(seed), transforms
        self.logger = logging.getLogger(name or __name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        seed = self.seed + rank + world * engine.state.epoch
        set_determinism(seed=seed)
        if self.transforms is not None:
            self.transforms.set_random_state(seed=seed)
        self.logger.info(f"rank {rank}: epoch {engine.state.epoch} draws with seed {seed}")
