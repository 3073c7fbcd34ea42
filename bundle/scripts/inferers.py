"""Inference along the networks' geometry: whole planes, chunk by chunk, no window overlap.

G_c / G_s are 2-D networks on coronal / sagittal planes and G_a works on pairs of axial
slices, so a 3-D sliding window only adds overlap (computed twice) and window edges (the
attention statistics would see the window, not the plane). ``PlaneInferer`` runs each view
network on whole planes, ``plane_chunk`` at a time, and adds the results into one output
volume in place (ICMDNet.synthesize). With ``tune``, ``PlaneCallTuner`` measures on the machine
that predicts how many planes per call (up to ``plane_chunk``, the memory budget's limit) and
which memory layout run fastest, instead of a fixed choice.
"""

from __future__ import annotations

import logging
import time

import torch
from monai.inferers import Inferer, SlidingWindowInferer

from .runtime import autocast, conv_probe_seconds, cpu_cores

logger = logging.getLogger(__name__)

# planes per call the tuner may try (up to the memory budget's limit): only counts that give the
# same voxels bit for bit, so that the output never depends on a timing (a killed and resumed batch,
# or two machines, write identical files). Measured with the shipped x4 prior on a 200 x 160 x 20
# volume: in channels-last, 2, 4 and 8 planes per call are bit-identical in float32 and in bf16;
# 1 plane per call (another oneDNN path) and the contiguous layout change voxels by float rounding
# (up to 6e-7 standardised units in float32, 3e-3 in bf16), so neither is a candidate
TUNE_SIZES = (2, 4, 8)
# a view is tuned only where its planes are at least this many times the planes the trials take,
# so the trials are a small share of it (their outputs are kept: only a slower candidate costs)
TUNE_MIN_RATIO = 4

# per process: (network, plane shape, device, threads, precision) -> (planes per call, channels_last, timings)
_CHOICES: dict[tuple, tuple[int, bool, dict]] = {}


def _signature(network: torch.nn.Module) -> tuple:
    return (type(network).__name__, tuple((n, tuple(p.shape)) for n, p in network.named_parameters()))


class PlaneCallTuner:
    """Planes per network call, measured on this machine during the synthesis.

    ICMDNet.synthesize asks ``size(network, plane_shape, left, total)`` for the planes of its next
    call and runs it through ``__call__(network, planes)``. The first calls of a view are the
    trials, and their outputs are kept (TUNE_SIZES holds only counts whose outputs are
    bit-identical): the sizes of TUNE_SIZES up to ``most``, in the given layout (channels-last by
    default: the layout changes voxels by float rounding, so it is not tuned; it was the faster on
    every CPU measured, docs/PERFORMANCE.md); each candidate runs twice, the first call paying
    oneDNN's kernel creation and first-touch page faults, the second timed. The rest of the view
    runs with the candidate of the fewest seconds per plane, and the choice is kept for the process
    (per network, plane shape, device, threads and precision), so that a batch's later cases start
    with it. A view with fewer than TUNE_MIN_RATIO x the trials' planes, or a budget that holds
    fewer than two sizes, runs ``most`` planes per call.
    """

    def __init__(self, most: int, channels_last: bool, device: torch.device, precision: str = ""):
        self.most = int(most) if most and most > 0 else max(TUNE_SIZES)
        self.channels_last, self.device, self.precision = channels_last, torch.device(device), precision
        self.trials: dict[tuple, dict] = {}  # key -> {"queue": [...], "seconds": {candidate: s/plane}}
        self._format: dict[int, bool] = {}
        self._next: tuple[int, bool] | None = None

    def _key(self, network: torch.nn.Module, plane_shape: tuple) -> tuple:
        threads = torch.get_num_threads() if self.device.type == "cpu" else 0
        return (_signature(network), tuple(plane_shape), str(self.device), threads, self.precision, self.most)

    def _candidates(self) -> list[int]:
        return [s for s in TUNE_SIZES if s <= self.most]

    def _trial_planes(self) -> int:
        return 2 * sum(self._candidates())

    def size(self, network: torch.nn.Module, plane_shape: tuple, left: int, total: int) -> int:
        """Planes of the next call of ``network`` on planes of ``plane_shape`` (``left`` of ``total`` to go)."""
        key = self._key(network, plane_shape)
        if key in _CHOICES:
            size, channels_last, _ = _CHOICES[key]
        elif key in self.trials or (
            len(self._candidates()) > 1 and total >= TUNE_MIN_RATIO * self._trial_planes()
        ):
            trial = self.trials.setdefault(key, {"queue": self._layouts(), "seconds": {}})
            size, channels_last = trial["queue"][0]
        else:
            size, channels_last = self.most, self.channels_last
        self._next = (key, size, channels_last)
        return size

    def _layouts(self) -> list[tuple[int, bool]]:
        """The trial calls: each candidate twice (the second timed), in the given layout."""
        return [(size, self.channels_last) for size in self._candidates() for _ in range(2)]

    def __call__(self, network: torch.nn.Module, planes: torch.Tensor) -> torch.Tensor:
        key, size, channels_last = self._next
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        weights = id(next(network.parameters()))  # G_a's wrapper is made anew; its weights are not
        if self._format.get(weights) != channels_last:
            network.to(memory_format=memory_format)
            self._format[weights] = channels_last
        trial = self.trials.get(key) if key not in _CHOICES else None
        start = time.perf_counter()
        pred = network(planes.contiguous(memory_format=memory_format))
        if trial is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - start
            queue = trial["queue"]
            candidate = queue.pop(0)
            if candidate not in queue:  # its second call: the timed one
                trial["seconds"][candidate] = seconds / size
            if not queue:
                self._advance(key, trial)
        return pred

    def _advance(self, key: tuple, trial: dict) -> None:
        seconds = trial["seconds"]
        if not trial["queue"]:
            size, channels_last = min(seconds, key=seconds.get)
            _CHOICES[key] = (size, channels_last, dict(seconds))
            measured = ", ".join(
                f"{s} {'channels-last' if cl else 'contiguous'} {t * 1e3:.0f}"
                for (s, cl), t in seconds.items()
            )
            logger.info(
                f"plane inference: {size} plane{'s' * (size > 1)} per call, "
                f"{'channels-last' if channels_last else 'contiguous'} (measured ms per plane: {measured})"
            )


def plane_call_choices() -> dict[tuple, tuple[int, bool, dict]]:
    """What the tuners of this process chose: key -> (planes per call, channels_last, {candidate: s/plane})."""
    return dict(_CHOICES)


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
        logger.info("plane inference precision: %s", _PRECISION[device.type][1])
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
            memory budget (with ``tune``, the most per call). 0 = all planes of a view at once.
        amp: autocast on the network's device ("bf16", "fp16" or "" for none), or "auto" (the
            planner's choice): decided on the machine that runs the bundle, at its first call
            (run_time_precision: bf16 on CUDA, on a CPU only where it has bf16 instructions).
        channels_last: run the convolutions in NHWC (oneDNN's and cuDNN's fast layout).
        tune: measure the planes per call (``plane_chunk`` at most) and the layout on this machine
            (``PlaneCallTuner``) instead of ``plane_chunk`` and ``channels_last``.
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
        tune: bool = False,
        progress: bool = False,
        traced_roi_size: tuple[int, int, int] | list[int] = (128, 128, -1),
    ):
        super().__init__()
        if amp not in ("", "bf16", "fp16", "auto"):
            raise ValueError(f"amp must be '', 'bf16', 'fp16' or 'auto', got {amp!r}")
        self.plane_chunk, self.amp, self.channels_last = int(plane_chunk), amp, channels_last
        self.cudnn_benchmark, self.tune, self.progress = cudnn_benchmark, tune, progress
        self.traced_roi_size = tuple(traced_roi_size)

    def _precision(self, device: torch.device) -> str:
        return run_time_precision(device)[0] if self.amp == "auto" else self.amp

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
        net = getattr(network, "module", network)  # DistributedDataParallel wraps the ICMDNet
        device = next(net.parameters()).device
        if device.type == "cpu":
            torch.set_num_threads(cpu_cores())
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
        precision = self._precision(device)
        tuner = PlaneCallTuner(self.plane_chunk, self.channels_last, device, precision) if self.tune else None
        counts = net.plane_counts(volume.shape)
        bar = None
        if self.progress:
            from tqdm import tqdm

            total = sum(counts[v] for v in net.fusion_views)
            # leave=None: kept when it is the only bar, cleared when it sits under a batch's bar of cases
            bar = tqdm(total=total, desc="synthesis", unit="plane", dynamic_ncols=True, leave=None)
        b, _, x, y, z = volume.shape
        # made outside inference mode: the post-processing works on it in place
        out = torch.empty((b, 1, x, y, z * net.factor), dtype=torch.float32, device=volume.device)
        try:
            with torch.inference_mode(), autocast(device, precision):
                return net.synthesize(
                    volume,
                    self.plane_chunk,
                    device,
                    prepare=lambda planes: planes.contiguous(memory_format=memory_format),
                    on_chunk=bar.update if bar is not None else None,
                    out=out,
                    calls=tuner,
                )
        finally:
            if bar is not None:
                bar.close()
