"""The planner's measurements on this machine: counted FLOPs and timed probes, no decisions.

planner.py decides from the fingerprint and from these (nnU-Net keeps its fingerprint extractor,
its experiment planner and its plans apart; here the measurements get their own module too):

    flops_per_output_voxel   inference FLOPs per output voxel (torch's FlopCounterMode)
    training_step_flops      FLOPs of a training step, forward and backward
    validation_flops         FLOPs of validating one volume's held-out slices
    step_seconds             a training step per distillation stage at the fastest CPU thread
                             count (timing.probe_training_step: warm-up untimed, synchronised)
    samples_per_second       a training step's throughput at a batch size (GPU batch doubling)
    precision_probe          a training step in float32 and under bf16 autocast, and their losses
    training_run_costs       what a run costs beyond its steps: the start-up of a training process
                             and two short epochs of the bundle's own training workflow (train.json
                             with the plan's values, one case, validated after each epoch), timed
                             with Ignite events
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from types import SimpleNamespace

import torch

from . import timing
from .timing import conv_probe_seconds, probe_training_step, torch_threads, training_step_timings

__all__ = [
    "conv_probe_seconds",
    "flops_per_output_voxel",
    "precision_probe",
    "probe_training_step",
    "samples_per_second",
    "training_run_costs",
    "training_step_flops",
    "training_step_timings",
    "validation_flops",
]

# the run probe: epochs of the bundle's training workflow (the first pays the warm-up, the last is
# timed) and iterations per epoch (the median of their spacing is the seconds per iteration)
RUN_PROBE_EPOCHS = 2
RUN_PROBE_ITERATIONS = 6


def flops_per_output_voxel(net: torch.nn.Module, factor: int) -> float:
    """Inference FLOPs per output voxel, counted by PyTorch's FlopCounterMode on a 64x64x8 volume."""
    from torch.utils.flop_counter import FlopCounterMode

    volume = torch.zeros(1, 1, 64, 64, 8)
    net.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(volume)
    return counter.get_total_flops() / (64 * 64 * ((8 - 1) * factor + 1))


def training_step_flops(net, iteration, patch: list[int], batch: int, stage: int) -> float:
    """FLOPs of one training step (forward and backward), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    net.train()
    with FlopCounterMode(display=False) as counter:
        terms = net(
            torch.zeros(batch, 1, *patch),
            objective=lambda n, v: iteration.losses(n, v, stage, iteration.gamma),
        )
        terms["total"].backward()
    net.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def validation_flops(net, validation, shape: list[int]) -> float:
    """FLOPs of validating one volume's held-out slices, (X, Y, h + 1), counted as above."""
    from torch.utils.flop_counter import FlopCounterMode

    engine = SimpleNamespace(state=SimpleNamespace(device=torch.device("cpu")), network=net, amp=False)
    with FlopCounterMode(display=False) as counter:
        validation(engine, {"image": torch.zeros(1, 1, *shape)})
    return float(counter.get_total_flops())


def step_seconds(
    net, iteration, patch: list[int], batch: int, stages: list[int], amp: bool, threads: int | None
) -> dict:
    """timing.probe_training_step under the precision training will use (``amp``: the trainer's
    autocast), at ``threads`` or at each candidate thread count (the fastest kept)."""
    return probe_training_step(net, iteration, patch, batch, stages, amp=amp, threads=threads)


def samples_per_second(net, iteration, patch: list[int], batch: int, stage: int, device) -> float:
    """Training samples per second at ``batch`` on ``device`` (bf16/fp16 autocast, as on a GPU)."""
    seconds = statistics.median(
        training_step_timings(net, iteration, patch, batch, stage, device, amp=True, repeats=3)
    )
    return batch / seconds


def precision_probe(net, iteration, patch: list[int], stage: int, rounds: int) -> dict:
    """A training step on the CPU in float32 and under bf16 autocast (batch 1, ``patch``): the best
    of ``rounds`` interleaved timings of each (a busy machine slows both alike), and the relative
    difference of their losses on the same planes."""
    volume = torch.randn(1, 1, *patch, generator=torch.Generator().manual_seed(0))
    losses = []
    for amp in (False, True):
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)  # the same planes drawn both times
            with timing.autocast(torch.device("cpu"), amp):
                terms = net(volume, objective=lambda n, v: iteration.losses(n, v, stage, iteration.gamma))
            losses.append(float(terms["total"]))
    fp32 = bf16 = float("inf")
    cpu = torch.device("cpu")
    for _ in range(rounds):
        fp32 = min(fp32, *training_step_timings(net, iteration, patch, 1, stage, cpu, warmup=1, repeats=1))
        bf16 = min(
            bf16, *training_step_timings(net, iteration, patch, 1, stage, cpu, amp=True, warmup=1, repeats=1)
        )
    return {
        "fp32": fp32,
        "bf16": bf16,
        "loss_difference": abs(losses[1] - losses[0]) / max(abs(losses[0]), 1e-12),
    }


@contextlib.contextmanager
def _workflow_output_off():
    """The probe's workflow logs at INFO (MONAI's StatsHandler, Ignite's engines) and warns (MONAI's
    GradScaler on a CPU): not the plan's output."""
    logging.disable(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


# what the training process imports before it reads its configs (`python -m monai.bundle run`)
STARTUP_IMPORTS = "import torch, monai.bundle, ignite.engine, monai.engines"


def startup_seconds() -> float:
    """Seconds a new Python process takes to import what training imports, on this machine now."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", STARTUP_IMPORTS], check=True, capture_output=True)
    return time.perf_counter() - start


def training_run_costs(values: dict, threads: int | None) -> dict:
    """Seconds that training spends around its steps, measured on the bundle's own training workflow.

    The template's ``train.json`` with ``values`` over it (the plan's config values; ``datalist``
    holds the one case probed) runs RUN_PROBE_EPOCHS epochs of RUN_PROBE_ITERATIONS iterations,
    validated after each, checkpointed and logged as a real run is, in this process (the bundle's
    code under a private name, its loggers silenced, the random state and thread count restored).
    From the last epoch, timed by Ignite events:

        startup     a new process's imports (startup_seconds)
        load        seconds to parse the configs, read and cache the case for training and validation
        iteration   the median spacing of its iterations: data loading, the step, per-iteration
                    handlers (metrics log, TensorBoard, learning-rate schedule)
        epoch       the epoch's end without its validation: checkpoint, epoch handlers
        validation  one validation of the case
    """
    from ignite.engine import Events
    from monai.bundle import ConfigParser
    from monai.engines import SupervisedEvaluator

    from . import runner
    from .template import TEMPLATE_DIR

    marks: dict = {"iterations": [], "epochs": [], "validations": []}
    with (
        tempfile.TemporaryDirectory(prefix="icmd_probe_") as root,
        torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []),
        torch_threads(threads),
        _workflow_output_off(),
        runner._sys_path_kept(),
    ):
        parser = ConfigParser()
        parser.read_config(str(TEMPLATE_DIR / "configs" / "train.json"))
        icmd = {**parser["icmd"], **values.get("icmd", {})}
        parser.update(
            {
                **runner.private_targets(TEMPLATE_DIR, ["train.json"]),
                **values,
                "icmd": icmd,
                "bundle_root": root,
                "epochs": RUN_PROBE_EPOCHS,
                "iterations_per_epoch": RUN_PROBE_ITERATIONS,
                "time_limit_s": 0,
                "progress": False,
                "init_weights": None,
            }
        )
        parser.update({"validation#interval": 1})
        start = time.perf_counter()
        trainer = parser.get_parsed_content("train#trainer")  # caches the case (CacheDataset)
        evaluator: SupervisedEvaluator = parser.get_parsed_content("validate#evaluator")
        load = time.perf_counter() - start
        parser.get_parsed_content("train#checkpoint").attach(trainer)
        # registered last, so an epoch's mark follows its validation and checkpoint
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED,
            lambda e: marks["iterations"].append((e.state.epoch, time.perf_counter())),
        )
        trainer.add_event_handler(
            Events.EPOCH_COMPLETED, lambda e: marks["epochs"].append(time.perf_counter())
        )
        evaluator.add_event_handler(
            Events.STARTED, lambda e: marks["validations"].append([time.perf_counter()])
        )
        evaluator.add_event_handler(
            Events.COMPLETED, lambda e: marks["validations"][-1].append(time.perf_counter())
        )
        trainer.run()
    last = [t for epoch, t in marks["iterations"] if epoch == RUN_PROBE_EPOCHS]
    validations = [v[1] - v[0] for v in marks["validations"] if len(v) == 2]
    validation = validations[-1] if validations else 0.0
    return {
        "startup": startup_seconds(),
        "load": load,
        "iteration": statistics.median(b - a for a, b in zip(last, last[1:])),
        "epoch": max(marks["epochs"][-1] - last[-1] - validation, 0.0),
        "validation": validation,
    }
