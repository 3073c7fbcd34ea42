"""How the networks run on this machine: precision (autocast) and CPU threads, in one place.

Training, validation, inference, pretraining and the planner's probes all take these from here
(icmd_auto imports them through ``icmd_auto.template.scripts``), so that the bundle alone, without
icmd_auto installed, runs exactly as the package does:

    cpu_cores           the cores this process may run on (its affinity; a container's limit)
    torch_threads       run a block with n intra-op threads, then restore the caller's count
    autocast_dtype      the dtype a precision setting computes in (None: float32)
    autocast            the one ``torch.autocast`` of the project, from a precision setting
    conv_probe_seconds  a small 3x3-conv stack in float32 or under autocast: is bf16 worth it here
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

# names a config or plans.json may give a precision by (the bundle's "amp" keys)
PRECISION_NAMES = {
    "": None,
    "fp32": None,
    "float32": None,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity; a container's limit where one is set)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return max(os.cpu_count() or 1, 1)


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run with ``threads`` intra-op CPU threads (None or 0: leave them), then restore the caller's count."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def autocast_dtype(device: torch.device | str, precision) -> torch.dtype | None:
    """The dtype autocast computes in on ``device`` for ``precision``; None for float32 (no autocast).

    ``precision``: None, False or "" (float32); True (the device's own: bf16 on a CPU and on GPUs
    that have it, whose exponent range is float32's; fp16 on older GPUs); a torch dtype; or a name
    of PRECISION_NAMES ("bf16", "bfloat16", "fp16", "float16", "fp32").
    """
    device = torch.device(device)
    if precision is None or precision is False:
        return None
    if precision is True:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    if isinstance(precision, torch.dtype):
        return None if precision == torch.float32 else precision
    if precision not in PRECISION_NAMES:
        raise ValueError(
            f"precision must be one of {sorted(PRECISION_NAMES)}, True, False or a dtype, got {precision!r}"
        )
    return PRECISION_NAMES[precision]


def autocast(device: torch.device | str, precision):
    """``torch.autocast`` on ``device`` in ``autocast_dtype(device, precision)``; a null context for float32."""
    device = torch.device(device)
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def conv_probe_seconds(dtype: torch.dtype | None, repeats: int = 3) -> float:
    """Best wall time of a small 32-channel 3x3 conv stack in channels-last (the planar networks'
    work) on the CPU, in float32 (``dtype`` None) or under autocast in ``dtype``."""
    convs = torch.nn.Sequential(*[torch.nn.Conv2d(32, 32, 3, padding=1) for _ in range(2)]).eval()
    convs = convs.to(memory_format=torch.channels_last)
    x = torch.randn(4, 32, 128, 32).contiguous(memory_format=torch.channels_last)
    best = float("inf")
    with torch.inference_mode(), autocast("cpu", dtype):
        for _ in range(repeats + 1):
            start = time.perf_counter()
            convs(x)
            best = min(best, time.perf_counter() - start)
    return best
