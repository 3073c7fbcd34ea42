"""Device timing and sizing: what the planner measures on this machine, apart from what it decides.

The planner (planner.py) decides from the fingerprint and from measurements; the measurements live
here, as nnU-Net keeps its experiment planners apart from the fingerprint and the plans:

    training_step_timings   a full training step (forward, backward, Adam) on the device training
                            will use (CUDA when present), after untimed warm-up steps that pay for
                            the CUDA context, cuDNN autotuning and the allocator; synchronised;
                            every timed step recorded, the median taken
    probe_training_step     the same for each candidate CPU thread count: torch's OpenMP threads
                            that outnumber the free cores spin at barriers (on a 2-core machine with
                            one other busy process, 2 threads ran a step ~10x slower than 1), so the
                            probe measures under the load training will see and the fastest count
                            is what training uses
    machine_description     the machine a timing was measured on, as plans.json records it

Precision (autocast), the CPU-core count, thread control and the float32/bf16 conv probe have one
home, the bundle's ``scripts/runtime.py`` (the bundle alone uses them too); they are imported here.
"""

from __future__ import annotations

import copy
import platform
import statistics
import time

import torch

from .template import scripts

# the one definition of each, in the bundle's scripts (re-exported for the planner and pretraining)
autocast = scripts.runtime.autocast
conv_probe_seconds = scripts.runtime.conv_probe_seconds
cpu_cores = scripts.runtime.cpu_cores
torch_threads = scripts.runtime.torch_threads

WARMUP_STEPS = 2  # untimed: the first steps pay one-off costs (allocator, CUDA context, cuDNN autotuning)
TIMED_STEPS = 5  # timed; the median is the step time (robust to one interrupted step)


def thread_candidates(cores: int | None = None) -> list[int]:
    """CPU thread counts the probe tries: all the cores, half of them, one (distinct, descending)."""
    cores = cores or cpu_cores()
    return sorted({cores, max(cores // 2, 1), 1}, reverse=True)


def training_device() -> torch.device:
    """The device the bundle trains on (train.json's ``device``): the first CUDA GPU, else the CPU."""
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def machine_description() -> str:
    """The machine a timing is measured on, as plans.json records it."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    return f"{cpu_cores()} CPU cores ({cpu}), {gpu}"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_step_timings(
    net: torch.nn.Module,
    iteration,
    patch: list[int],
    batch: int,
    stage: int,
    device: torch.device | None = None,
    amp: bool = False,
    warmup: int = WARMUP_STEPS,
    repeats: int = TIMED_STEPS,
) -> list[float]:
    """Seconds of each of ``repeats`` full training steps (forward, backward, Adam) on ``device``,
    after ``warmup`` untimed ones; with ``amp``, under autocast (bf16 on a CPU and on GPUs that
    have it), as the bundle's trainer runs. ``net`` is not changed (a copy is trained)."""
    device = device or training_device()
    net = copy.deepcopy(net).to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), 1e-4)
    volume = torch.randn(batch, 1, *patch, generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    for step in range(warmup + repeats):
        _synchronize(device)
        start = time.perf_counter()
        with autocast(device, amp):
            terms = net(volume, objective=lambda n, v: iteration.losses(n, v, stage, iteration.gamma))
        terms["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


def probe_training_step(
    net,
    iteration,
    patch: list[int],
    batch: int,
    stages: list[int],
    amp: bool = False,
    threads: int | None = None,
) -> dict:
    """Median seconds per training step for each stage, at the CPU thread count that runs fastest.

    On a CPU every candidate of thread_candidates() (or only ``threads``, where given) is timed
    under the machine's present load and the fastest kept; on CUDA the step runs on the GPU with
    the process's threads. Returns
    {"threads": n, "per_stage": {stage: median}, "timings": {threads: {stage: [seconds...]}},
    "device": ...}.
    """
    device = training_device()
    candidates = [None] if device.type == "cuda" else [threads] if threads else thread_candidates()
    timings: dict = {}
    for threads in candidates:
        with torch_threads(threads):
            timings[threads] = {
                s: training_step_timings(net, iteration, patch, batch, s, device=device, amp=amp)
                for s in stages
            }
    best = min(candidates, key=lambda n: sum(statistics.median(t) for t in timings[n].values()))
    return {
        "device": str(device),
        "threads": best,
        "per_stage": {s: statistics.median(t) for s, t in timings[best].items()},
        "timings": {
            str(n or "default"): {str(s): [round(x, 5) for x in t] for s, t in per.items()}
            for n, per in timings.items()
        },
    }
