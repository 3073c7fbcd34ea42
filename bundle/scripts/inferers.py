"""Inference along the networks' geometry: whole planes, chunk by chunk, no window overlap.

G_c / G_s are 2-D networks on coronal / sagittal planes and G_a works on pairs of axial
slices, so a 3-D sliding window only adds overlap (computed twice) and window edges (the
attention statistics would see the window, not the plane). ``PlaneInferer`` runs each view
network on whole planes, ``plane_chunk`` at a time, and adds the results into one output
volume in place (ICMDNet.synthesize).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import torch
from monai.inferers import Inferer, SlidingWindowInferer


def cpu_threads() -> int:
    """The cores this process may run on (its affinity), for torch's intra-op threads."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)


def conv_probe_seconds(dtype: torch.dtype | None, repeats: int = 3) -> float:
    """Best wall time on the CPU of a small 32-channel 3x3 conv stack in channels-last (the planar
    networks' work), in float32 (``dtype`` None) or under autocast to ``dtype``."""
    convs = torch.nn.Sequential(*[torch.nn.Conv2d(32, 32, 3, padding=1) for _ in range(2)]).eval()
    convs = convs.to(memory_format=torch.channels_last)
    x = torch.randn(4, 32, 128, 32).contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
    best = float("inf")
    with torch.inference_mode(), autocast:
        for _ in range(repeats + 1):
            start = time.perf_counter()
            convs(x)
            best = min(best, time.perf_counter() - start)
    return best


BF16_MAX_TIME_SHARE = (
    0.8  # on a CPU, bf16 autocast where the probe runs in under this share of float32's time
)
_PRECISION: dict[str, tuple[str, str]] = {}  # per device type, for the process: the probe runs once


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # the instructions oneDNN's fast bf16 convolutions use


def cpu_bf16_flags() -> list[str] | None:
    """The BF16_CPU_FLAGS this CPU reports (Linux /proc/cpuinfo), None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return None if flags is None else [f for f in BF16_CPU_FLAGS if f in flags]


def run_time_precision(device: torch.device) -> tuple[str, str]:
    """``amp: "auto"`` resolved on the machine that predicts, once per process: "bf16" on CUDA; on a
    CPU "bf16" where it has bf16 instructions (BF16_CPU_FLAGS: the same machine always predicts
    the same voxels), else "" (float32: CPUs without fast bf16 convolutions run bf16 several
    times slower); where the flags cannot be read, a 3x3-conv probe decides (bf16 if it runs in
    under BF16_MAX_TIME_SHARE of float32's time). Returns (precision, reason)."""
    flags = cpu_bf16_flags() if device.type == "cpu" else None
    if device.type not in _PRECISION:
        if device.type == "cuda":
            _PRECISION["cuda"] = ("bf16", "CUDA: bf16 autocast")
        elif flags is not None:
            _PRECISION["cpu"] = (
                ("bf16", f"bf16 autocast: this CPU has {', '.join(flags)}")
                if flags
                else (
                    "",
                    f"float32: this CPU has none of {', '.join(BF16_CPU_FLAGS)} (no fast bf16 convolutions)",
                )
            )
        elif device.type == "cpu":
            fp32, bf16 = conv_probe_seconds(None), conv_probe_seconds(torch.bfloat16)
            faster = bf16 < BF16_MAX_TIME_SHARE * fp32
            _PRECISION["cpu"] = (
                "bf16" if faster else "",
                f"{'bf16 autocast' if faster else 'float32'}: a 3x3-conv probe ran in {bf16 * 1e3:.1f} ms with bf16 "
                f"autocast against {fp32 * 1e3:.1f} ms in float32 on this CPU",
            )
        else:
            _PRECISION[device.type] = ("", f"float32 on {device.type}")
        logging.getLogger(__name__).info("plane inference precision: %s", _PRECISION[device.type][1])
    return _PRECISION[device.type]


class PlaneInferer(Inferer):
    """``inferer(inputs, network)``: (B, 1, X, Y, Z) standardised thick volume -> (B, 1, X, Y, r*Z).

    A network without ``synthesize`` (the traced TorchScript export, whose graph holds one in-plane
    size) runs in MONAI's sliding windows of ``traced_roi_size`` spanning all slices.

    The network is an ICMDNet; its fusion decides the views. The output is float32 on the
    inputs' device (the CPU in inference.json: the volume never has to fit on the GPU); only a
    chunk of planes at a time moves to the network's device.

    Args:
        plane_chunk: planes (or axial slice pairs) per network call; the planner sizes it to the
            memory budget. 0 = all planes of a view at once.
        amp: autocast on the network's device ("bf16", "fp16" or "" for none), or "auto" (the
            planner's choice): decided on the machine that runs the bundle, at its first call
            (run_time_precision: bf16 on CUDA, on a CPU only where a probe finds it faster).
        channels_last: run the convolutions in NHWC (oneDNN's and cuDNN's fast layout).
        cudnn_benchmark: let cuDNN pick the fastest convolution algorithms (CUDA only).
        progress: a progress bar over the chunks (tqdm).
        traced_roi_size: the in-plane size a TorchScript export was traced at (icmd_auto export's 128).
    """

    def __init__(
        self,
        plane_chunk: int = 8,
        amp: str = "",
        channels_last: bool = True,
        cudnn_benchmark: bool = True,
        progress: bool = False,
        traced_roi_size: tuple[int, int, int] | list[int] = (128, 128, -1),
    ):
        super().__init__()
        if amp not in ("", "bf16", "fp16", "auto"):
            raise ValueError(f"amp must be '', 'bf16', 'fp16' or 'auto', got {amp!r}")
        self.plane_chunk, self.amp, self.channels_last = int(plane_chunk), amp, channels_last
        self.cudnn_benchmark, self.progress = cudnn_benchmark, progress
        self.traced_roi_size = tuple(traced_roi_size)

    def _autocast(self, device: torch.device):
        amp = run_time_precision(device)[0] if self.amp == "auto" else self.amp
        if not amp:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
        net = getattr(network, "module", network)  # DistributedDataParallel wraps the ICMDNet
        device = next(net.parameters()).device
        if device.type == "cpu":
            torch.set_num_threads(cpu_threads())
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = self.cudnn_benchmark
        volume = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
        if not hasattr(
            net, "synthesize"
        ):  # a TorchScript export (models/model.ts): traced at one in-plane size
            windows = SlidingWindowInferer(
                self.traced_roi_size, overlap=0.25, mode="gaussian", progress=self.progress
            )
            with torch.inference_mode():
                pred = windows(volume, network)
            return pred.clone()  # outside inference mode: post-processing works on it in place
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        net.to(memory_format=memory_format)
        counts = net.plane_counts(volume.shape)
        total = sum(-(-counts[v] // (self.plane_chunk or counts[v])) for v in net.fusion_views)
        bar = None
        if self.progress:
            from tqdm import tqdm

            # leave=None: kept when it is the only bar, cleared when it sits under a batch's bar of cases
            bar = tqdm(total=total, desc="synthesis", unit="chunk", dynamic_ncols=True, leave=None)
        b, _, x, y, z = volume.shape
        # made outside inference mode: the post-processing works on it in place
        out = torch.empty((b, 1, x, y, z * net.factor), dtype=torch.float32, device=volume.device)
        try:
            with torch.inference_mode(), self._autocast(device):
                return net.synthesize(
                    volume,
                    self.plane_chunk,
                    device,
                    prepare=lambda planes: planes.contiguous(memory_format=memory_format),
                    on_chunk=bar.update if bar is not None else None,
                    out=out,
                )
        finally:
            if bar is not None:
                bar.close()
