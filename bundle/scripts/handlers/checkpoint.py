"""Training state on disk: atomic checkpoints, resume from the latest, and RNG states."""

from __future__ import annotations

import glob
import logging
import os
import random
import re

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointSaver
from monai.transforms import Randomizable


def _numpy_state(state: tuple) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {
        "name": name,
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _numpy_tuple(state: dict) -> tuple:
    return (
        state["name"],
        state["keys"].numpy().astype(np.uint32),
        state["pos"],
        state["has_gauss"],
        state["cached"],
    )


class RNGState:
    """Every random state a run depends on, as a state dict of tensors and numbers.

    torch, numpy and Python's global generators, and the private RandomState of each random
    transform in ``transforms`` (MONAI's Randomizable transforms own one each). Saved with the
    checkpoint so that a resumed run draws the same patches as an uninterrupted one.
    """

    def __init__(self, transforms=None):
        self.transforms = transforms

    def _randomizables(self) -> list[Randomizable]:
        chain = getattr(self.transforms, "transforms", self.transforms) or []
        return [t for t in chain if isinstance(t, Randomizable)]

    def state_dict(self) -> dict:
        py = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state(np.random.get_state()),
            "python": {"version": py[0], "state": list(py[1]), "gauss": py[2]},
            "transforms": [_numpy_state(t.R.get_state()) for t in self._randomizables()],
        }

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(_numpy_tuple(state["numpy"]))
        random.setstate(
            (state["python"]["version"], tuple(state["python"]["state"]), state["python"]["gauss"])
        )
        for t, s in zip(self._randomizables(), state["transforms"]):
            t.R.set_state(_numpy_tuple(s))


def _epoch_of(path: str) -> int:
    m = re.search(r"_(\d+)\.pt$", path)
    return int(m.group(1)) if m else -1


def latest_checkpoint(directory: str, prefix: str = "checkpoint") -> str | None:
    """The checkpoint file with the highest epoch in ``directory``, or None."""
    found = []
    for path in glob.glob(os.path.join(directory, f"{prefix}_*.pt")):
        m = re.search(r"_(\d+)\.pt$", path)
        if m:
            found.append((int(m.group(1)), path))
    return max(found)[1] if found else None


class GradScalerState:
    """The trainer's GradScaler as a state dict, so that a resumed mixed-precision run continues
    with the loss scale it had. SupervisedTrainer makes the scaler when it starts (amp on); with
    amp off, or on a CPU where the scaler is disabled, the state is empty."""

    def __init__(self, trainer):
        self.trainer = trainer

    def state_dict(self) -> dict:
        scaler = getattr(self.trainer, "scaler", None)
        return scaler.state_dict() if scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        scaler = getattr(self.trainer, "scaler", None)
        if scaler is not None and state:
            scaler.load_state_dict(state)


class _ReplacingSaver(DiskSaver):
    """Writes every checkpoint to one fixed file name, replacing it atomically; never removes it."""

    def __init__(self, dirname: str, filename: str):
        super().__init__(dirname, atomic=True, require_empty=False)
        self.filename = filename

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        super().__call__(checkpoint, self.filename, metadata)

    def remove(self, filename: str) -> None:  # the new file has replaced it
        pass


class BestModelSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver(save_key_metric=True)`` keeping the best model in one file, safely.

    Attached to the validation evaluator: when the key metric beats every earlier value, the
    network's state dict replaces ``<save_dir>/<key_metric_filename>`` (``model.pt``, what
    inference loads). Two changes to MONAI's saver: the file is replaced atomically (MONAI's
    deletes the old file and writes the new one in place, so a run killed between the two leaves
    no model or half of one), and ``state_dict`` / ``load_state_dict`` hold the best score and its
    epoch, which TrainingCheckpoint saves with the training state: a resumed run keeps a better
    model found before the interruption, and the evaluator's log reports the same best.
    """

    def __init__(self, save_dir: str, save_dict: dict, key_metric_filename: str = "model.pt", **kwargs):
        super().__init__(
            save_dir, save_dict, save_key_metric=True, key_metric_filename=key_metric_filename, **kwargs
        )
        os.makedirs(save_dir, exist_ok=True)
        self._key_metric_checkpoint.save_handler = _ReplacingSaver(save_dir, key_metric_filename)
        self.engine: Engine | None = None

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        self.engine = engine

    def state_dict(self) -> dict:
        state = {"saved": self._key_metric_checkpoint.state_dict()["_saved"]}
        if self.engine is not None:
            state["best_metric"] = float(self.engine.state.best_metric)
            state["best_metric_epoch"] = int(self.engine.state.best_metric_epoch)
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict({"_saved": state["saved"]})
        if self.engine is not None and "best_metric" in state:
            self.engine.state.best_metric = state["best_metric"]
            self.engine.state.best_metric_epoch = state["best_metric_epoch"]


class TrainingCheckpoint:
    """Save the training state every ``interval`` epochs and resume from the latest on start.

    Files (written atomically: a killed run never leaves a half-written file):
        ``<save_dir>/checkpoint_<epoch>.pt``: everything in ``save_dict`` (network, optimizer,
            scheduler, trainer, RNG states, the best-model tracking), the last ``n_saved`` kept;
        ``<save_dir>/model.pt``: with ``save_model``, the network's state dict alone, what
            inference loads, written at each save and when training ends (also when a time limit
            stops it). Without (training validates), BestModelSaver writes the best model there.

    Loading uses ``torch.load(weights_only=True)``. An entry of ``save_dict`` that a checkpoint
    lacks (saved by a configuration without it, e.g. before validation was switched on) starts
    fresh, with a log line; the network must be there.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        network: torch.nn.Module,
        interval: int = 1,
        n_saved: int = 1,
        resume: bool = True,
        save_model: bool = True,
        name: str | None = None,
    ):
        self.save_dir, self.save_dict, self.network = save_dir, save_dict, network
        self.interval, self.resume, self.save_model_file = max(int(interval), 1), resume, save_model
        self.logger = logging.getLogger(name or __name__)
        os.makedirs(save_dir, exist_ok=True)
        self.saver = DiskSaver(save_dir, atomic=True, require_empty=False)
        self.checkpoint = Checkpoint(
            save_dict,
            self.saver,
            filename_prefix="",
            n_saved=n_saved,
            global_step_transform=lambda engine, _: engine.state.epoch,
            filename_pattern="checkpoint_{global_step}.{ext}",
        )

    def _is_writer(self) -> bool:
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load_latest)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save_model)

    def load_latest(self, engine: Engine) -> None:
        path = latest_checkpoint(self.save_dir) if self.resume else None
        if path is None:
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        max_epochs = engine.state.max_epochs  # the configured run length wins over the saved one
        missing = [k for k in self.save_dict if k not in state and k != "network"]
        if missing:
            self.logger.info(f"{os.path.basename(path)} has no {', '.join(missing)}: starting them fresh")
        to_load = {k: v for k, v in self.save_dict.items() if k not in missing}
        Checkpoint.load_objects(to_load=to_load, checkpoint=state)
        engine.state.max_epochs = max(max_epochs, engine.state.epoch)
        self.logger.info(
            f"resumed from {os.path.basename(path)}: epoch {engine.state.epoch}, iteration {engine.state.iteration}"
        )

    def save(self, engine: Engine) -> None:
        if self._is_writer():
            self.checkpoint(engine)
            self._remove_older(engine.state.epoch)
        self.save_model(engine)

    def _remove_older(self, epoch: int) -> None:
        """Checkpoints of earlier runs (before a resume) are not tracked by Ignite; keep ``n_saved``."""
        found = sorted(glob.glob(os.path.join(self.save_dir, "checkpoint_*.pt")), key=_epoch_of)
        for path in found[: -self.checkpoint.n_saved]:
            if _epoch_of(path) < epoch:
                os.remove(path)

    def save_model(self, engine: Engine) -> None:
        if self.save_model_file and self._is_writer():
            net = self.network.module if hasattr(self.network, "module") else self.network
            self.saver(net.state_dict(), "model.pt")
