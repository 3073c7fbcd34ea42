"""Pretrain the shipped CT prior: G_c/G_s on scale-matched in-plane pairs of a set of CT volumes.

The prior is the ``inplane`` recipe's network (one HAN-style G_c = G_s, coronal/sagittal mean)
trained once, for hours of CPU or minutes of GPU, on every volume given, so that a user's scan
needs no training (zero-shot) or only a short fine-tune (warm start). The pairs are the ones the
per-scan recipe trains on (``ICMDIteration.planar_inplane``: axial slices degraded by r along x or
y), with the resampling scale (in-plane spacing / target slice spacing) drawn per crop from
``--scale_range`` instead of fixed by one dataset, so one prior serves scans of any spacing.
``--zpairs`` adds supervised pairs from the near-isotropic volumes' own z-axis (their coronal and
sagittal planes degraded along z), a switch measured in docs/RESULTS.md.

The data path is built for a GPU lent for minutes at a time (docs/PERFORMANCE.md, "Prior
pretraining throughput"):

- the volumes are resident on the device, standardised, in one flat tensor (``PlaneBank``); a
  batch of crops is drawn with tensor ops only: per crop a random plane, scale, position and one
  of the 8 flips/transposes, gathered by advanced indexing. No Python loop over planes and no
  host synchronisation inside a step; the loss is read every ``--log_every`` steps;
- bf16 autocast on CUDA (``--bf16``; on a CPU only where the planner's probe runs it faster), the planes
  per step sized to the device (``--planes``), ``--compile`` (torch.compile) on request,
  ``--threads`` from the process's CPU affinity; one process per GPU;
- a checkpoint every ``--checkpoint_every_s`` (``prior_x{r}.ckpt``: model, optimizer, step,
  training seconds, the schedule, the random state, the best weights and the validation curve);
  ``--resume`` continues from it exactly. The cosine learning rate runs over ``--total_minutes``
  of training summed over all leases, each lease (process) training ``--minutes``; the card
  appends each lease (device, steps, iterations/s, samples/s, GPU utilisation) and its part of
  the validation curve.

    # the shipped priors, r = 2..6, on all CT in ../shared/data
    python benchmarks/pretrain.py --factors 2 3 4 5 6 --minutes 5 --out icmd_auto/priors
    # a leave-one-out prior for the benchmark (not trained on the chest volume)
    python benchmarks/pretrain.py --factors 4 --leave_out chest_1.5mm --out runs/loo_chest
    # 8 minutes of a 60-minute schedule per GPU lease; the next lease's same command continues it
    python benchmarks/pretrain.py --factors 4 --minutes 8 --total_minutes 60 --resume --out runs/x4
    # more CT: every .nii.gz in a folder as well as the shared volumes
    python benchmarks/pretrain.py --factors 4 --data_dir more_ct --out runs/x4_more

Each factor writes ``prior_x{r}.pt`` (the ICMDNet state dict, the best by the held-out
validation PSNR), ``prior_x{r}.json`` (architecture, intensity standardisation, data, the
commands, the leases, the validation curve) and ``prior_x{r}.ckpt`` to ``--out``.
Validation: every 8th axial slice of each volume is held out of training; its in-plane pairs at
scale 1 give the PSNR of the prior and of linear interpolation on the same pixels.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from icmd_auto.fingerprint import load_case_array  # noqa: E402
from icmd_auto.planner import PRESETS, build_iteration, build_network, decide_inference_precision  # noqa: E402
from icmd_auto.template import scripts  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "ct"
VOLUMES = {
    "chest_1.5mm": "totalseg_chest_1.5mm.nii.gz",
    "abdomen_3mm": "totalseg_example_ct_3mm.nii.gz",
    "dicom_2mm": "totalseg_dicom_series",
}
DATA_LICENCE = (
    "CT from the public test files of the TotalSegmentator project (github.com/wasserth/TotalSegmentator, "
    "tests/reference_files/, Apache-2.0); images from the TotalSegmentator CT dataset (Wasserthal et al., "
    "Radiology: AI 2023, doi:10.1148/ryai.230024), CC BY 4.0"
)
RECIPE = "inplane"
METHOD = {"views": ["c", "s"], "fusion": "mean_cs", "inplane_pairs": True, "internal_pairs": False}
HOLD_OUT_EVERY = 8  # every 8th axial slice is validation only
ISOTROPIC_TOLERANCE = 0.1  # z-spacing within 10% of the in-plane spacing: the z-axis gives true pairs
# planes per step by device: 32 on a CPU (0.4-0.6 s a step on 2 cores, docs/PERFORMANCE.md); 256 on
# a GPU, 4x the 64 of the first GPU runs: a plane's activations saved for backward are 10 MB in bf16
# (20 MB in float32; small preset, patch 96, x4, counted with saved_tensors_hooks), so 2.6 GB. Which
# size fills an H200 best is for a GPU lease to measure (--planes)
DEFAULT_PLANES = {"cpu": 32, "cuda": 256}
CHECKPOINT_FORMAT = 2


@dataclass
class Volume:
    array: np.ndarray  # (X, Y, Z) float32, HU
    spacing: tuple[float, float, float]  # mm
    source: str  # the file or DICOM folder it was read from
    record: dict | None = None  # its entry in its folder's sources.json (licence, attribution, ...)


def source_records(folder: Path) -> dict[str, dict]:
    """The entries of ``folder/sources.json`` (benchmarks/fetch_ct.py's record: one per series, with
    its licence and attribution) by file name; none where the folder has no such file."""
    path = folder / "sources.json"
    if not path.is_file():
        return {}
    series = json.loads(path.read_text()).get("series", [])
    return {entry["file"]: {k: v for k, v in entry.items() if k not in ("file", "name")} for entry in series}


def load_volumes(data: Path, data_dirs: list[Path], leave_out: list[str]) -> dict[str, Volume]:
    """The pretraining CT by name: the shared volumes in ``data`` and every ``*.nii.gz`` in each of
    ``data_dirs`` (named by its file name without .nii.gz, with its entry of the folder's
    sources.json where there is one), less those named in ``leave_out``."""
    files = {name: data / file for name, file in VOLUMES.items()}
    records = {}
    for folder in data_dirs:
        records.update({str(folder / f): r for f, r in source_records(folder).items()})
        found = sorted(folder.glob("*.nii.gz"))
        if not found:
            raise SystemExit(f"--data_dir {folder}: no .nii.gz volumes in it")
        for path in found:
            name = path.name[: -len(".nii.gz")]
            if name in files:
                raise SystemExit(
                    f"--data_dir {folder}: {path.name} has the name of {files[name]}; rename one"
                )
            files[name] = path
    unknown = set(leave_out) - set(files)
    if unknown:
        raise SystemExit(f"--leave_out {sorted(unknown)}: not one of {sorted(files)}")
    volumes = {}
    for name, path in files.items():
        if name in leave_out:
            continue
        array, affine, _ = load_case_array(path)
        volumes[name] = Volume(
            array.astype(np.float32), scripts.io.voxel_spacing(affine), str(path), records.get(str(path))
        )
    if not volumes:
        raise SystemExit("no volumes left to train on (--leave_out names them all)")
    return volumes


def intensity_statistics(volumes: dict[str, Volume]) -> dict:
    """nnU-Net's CTNormalization over the pretraining set: pooled 0.5/99.5 percentiles, clipped mean/std."""
    pooled = np.concatenate(
        [v.array.reshape(-1)[:: max(v.array.size // 2_000_000, 1)] for v in volumes.values()]
    )
    low, high = np.percentile(pooled, [0.5, 99.5])
    clipped = np.clip(pooled, low, high)
    return {
        "clip_low": float(low),
        "clip_high": float(high),
        "mean": float(clipped.mean()),
        "std": float(clipped.std()),
        "clip_image": False,
    }


@dataclass
class PlaneTable:
    """Planes of a ``PlaneBank``'s flat tensor, one row each (int64 tensors on the device): the flat
    index of pixel (0, 0), height and width (pixels), the flat strides along height and width, and
    ``cdf``, the cumulative pick probability (a plane is picked in proportion to its pixels, i.e. a
    volume in proportion to its voxels, as the sampler before)."""

    base: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    stride_h: torch.Tensor
    stride_w: torch.Tensor
    cdf: torch.Tensor

    @classmethod
    def of(cls, rows: list[tuple[int, int, int, int, int]], device: torch.device) -> PlaneTable:
        columns = torch.tensor(rows, dtype=torch.int64).reshape(-1, 5).t()
        pixels = (columns[1] * columns[2]).double()
        cdf = (pixels.cumsum(0) / pixels.sum()).float()
        return cls(*(c.contiguous().to(device) for c in columns), cdf.to(device))

    def __len__(self) -> int:
        return self.base.shape[0]


class PlaneBank:
    """Standardised CT volumes resident on the device as one flat tensor, and crops of their planes.

    ``axial``: the training axial slices (X, Y) of every volume (every 8th held out);
    ``zplanes``: the coronal (X, Z) and sagittal (Y, Z) planes of the near-isotropic volumes
    (``zpairs``), z last. ``draw`` makes a batch of crops with tensor ops only.
    """

    def __init__(self, volumes: dict[str, Volume], intensity: dict, device: torch.device, zpairs: bool):
        mean, std = intensity["mean"], intensity["std"]
        self.flat = torch.cat(
            [torch.from_numpy((v.array - mean) / std).reshape(-1) for v in volumes.values()]
        ).to(device)
        self.volumes: dict[str, torch.Tensor] = {}  # (X, Y, Z) views into ``flat``
        self.zpair_volumes: list[str] = []
        axial, zrows, offset = [], [], 0
        for name, volume in volumes.items():
            x, y, z = volume.array.shape
            self.volumes[name] = self.flat[offset : offset + x * y * z].view(x, y, z)
            axial += [
                (offset + k, x, y, y * z, z) for k in range(z) if k % HOLD_OUT_EVERY != HOLD_OUT_EVERY // 2
            ]
            inplane = (volume.spacing[0] + volume.spacing[1]) / 2
            if zpairs and abs(volume.spacing[2] - inplane) <= ISOTROPIC_TOLERANCE * inplane:
                zrows += [(offset + b * z, x, z, y * z, 1) for b in range(y)]  # coronal, one per y
                zrows += [(offset + a * y * z, y, z, z, 1) for a in range(x)]  # sagittal, one per x
                self.zpair_volumes.append(name)
            offset += x * y * z
        self.axial = PlaneTable.of(axial, device)
        self.zplanes = PlaneTable.of(zrows, device) if zrows else None
        self.names = list(volumes)

    def check_fits(self, size: int, max_scale: float) -> None:
        """Fail early, naming the volume, where a plane cannot hold a crop of ``size`` pixels at the
        largest scale (a crop spans ``size / scale`` source pixels)."""
        for name, v in self.volumes.items():
            if min(v.shape[0], v.shape[1]) * max_scale < size:
                raise SystemExit(
                    f"{name}: axial slices of {v.shape[0]} x {v.shape[1]} pixels are too small for --patch "
                    f"{size} at the largest scale {max_scale} (--leave_out it, or a smaller --patch)"
                )
        for name in self.zpair_volumes:
            v = self.volumes[name]
            if min(v.shape) < size:
                raise SystemExit(f"{name}: {tuple(v.shape)} too small for --patch {size} z-axis pairs")

    def draw(
        self,
        table: PlaneTable,
        n: int,
        size: int,
        log_scales: tuple[float, float],
        generator: torch.Generator,
        flips: bool = True,
    ) -> torch.Tensor:
        """(n, 1, size, size) crops of random planes of ``table``.

        Per crop: a plane (probability by its pixels); a scale log-uniform in ``log_scales``, raised
        to ``size / min(height, width)`` where the plane is too small for a crop at the drawn scale;
        a position uniform over the whole-pixel positions where the crop fits; with ``flips`` one of
        the 8 flips/transposes. No host synchronisation.
        """
        u = torch.rand(5, n, generator=generator, device=self.flat.device)
        rows = torch.searchsorted(table.cdf, u[0]).clamp_(max=len(table) - 1)
        dims = torch.stack([table.height[rows], table.width[rows]], 1).float()  # (n, 2)
        low, high = log_scales
        scales = torch.exp(low + (high - low) * u[1]).maximum(size / dims.min(1).values)
        step = scales.reciprocal()
        extent = (size - 1) * step + 2 * area_half_width(step)  # source pixels, first to last sample
        room = (dims - 1 - extent[:, None]).clamp(min=0).floor()
        corners = (u[2:4].t() * (room + 1)).floor().minimum(room)
        codes = (u[4] * 8).long().clamp_(max=7) if flips else torch.zeros_like(rows)
        return self.crop(table, rows, corners, scales, codes, size)

    def crop(
        self,
        table: PlaneTable,
        rows: torch.Tensor,
        corners: torch.Tensor,
        scales: torch.Tensor,
        codes: torch.Tensor,
        size: int,
    ) -> torch.Tensor:
        """(N, 1, size, size): crop k of plane ``rows[k]`` resampled by ``scales[k]``.

        Crop k's first source sample is pixel ``corners[k]`` (h, w) of its plane, and it advances
        ``1 / scales[k]`` source pixels per output pixel. Each output pixel is the mean of 2 x 2
        bilinear samples ``(1/scale - 1) / 2`` pixels either side of its centre: shrinking by 2 this
        is area resampling (the mean of 2 x 2 pixels, as ``F.interpolate(mode="area")``), at scale 1
        the pixels themselves, enlarging bilinear interpolation. Then ``codes[k]`` transposes (bit 4)
        and flips along h (bit 1) and w (bit 2), in that order. One gather for the whole batch.
        """
        step = scales.reciprocal()
        half = area_half_width(step)
        i = torch.arange(size, device=step.device, dtype=step.dtype)
        centre = corners[:, :, None] + (half[:, None, None] + i * step[:, None, None])  # (N, 2, P)
        taps, weights = [], []
        for sign in (-1.0, 1.0):  # the two sub-samples along each axis
            position = centre + sign * half[:, None, None]
            floor = position.floor()
            frac = position - floor
            taps += [floor, floor + 1]
            weights += [(1 - frac) / 2, frac / 2]
        taps = torch.stack(taps, -1).long()  # (N, 2, P, 4)
        weights = torch.stack(weights, -1)
        # a sample on a plane's last pixel has its upper tap outside the plane, with weight 0
        limit = torch.stack([table.height[rows], table.width[rows]], 1)[:, :, None, None] - 1
        strides = torch.stack([table.stride_h[rows], table.stride_w[rows]], 1)[:, :, None, None]
        offsets = taps.minimum(limit) * strides
        index = (
            table.base[rows].view(-1, 1, 1, 1, 1)
            + offsets[:, 0, :, None, :, None]
            + offsets[:, 1, None, :, None, :]
        )  # (N, P, P, 4, 4)
        planes = torch.einsum("nijab,nia,njb->nij", self.flat[index], weights[:, 0], weights[:, 1])
        planes = torch.where((codes & 4).bool()[:, None, None], planes.transpose(1, 2), planes)
        planes = torch.where((codes & 1).bool()[:, None, None], planes.flip(1), planes)
        planes = torch.where((codes & 2).bool()[:, None, None], planes.flip(2), planes)
        return planes[:, None]

    def validation_pairs(self, factor: int, profile: str, size: int = 96) -> list:
        """Centre crops of every held-out slice, degraded along y and along x: (low, target) list."""
        pairs = []
        for volume in self.volumes.values():
            x, y, z = volume.shape
            held = volume[..., [k for k in range(z) if k % HOLD_OUT_EVERY == HOLD_OUT_EVERY // 2]]
            if held.shape[-1] == 0:
                continue
            p = min(size, x, y)
            a, b = (x - p) // 2, (y - p) // 2
            planes = held[a : a + p, b : b + p].permute(2, 0, 1)[:, None]
            for transpose in (False, True):
                pairs.append(scripts.degradation.inplane_pair(planes, factor, profile, transpose=transpose))
        return pairs


def area_half_width(step: torch.Tensor) -> torch.Tensor:
    """Offset of the two sub-samples from an output pixel's centre: (step - 1) / 2 source pixels when
    shrinking (``step`` > 1 source pixels per output pixel), 0 when enlarging."""
    return ((step - 1) / 2).clamp(min=0)


def psnr(pred: torch.Tensor, target: torch.Tensor, factor: int, data_range: float) -> float:
    """PSNR on the synthesized columns only (the known ones are exact for both)."""
    syn = torch.ones(target.shape[-1], dtype=torch.bool, device=target.device)
    syn[::factor] = False
    mse = float(((pred[..., syn] - target[..., syn]) ** 2).mean())
    return 10 * math.log10(data_range**2 / max(mse, 1e-12))


@torch.no_grad()
def validate(net, pairs, factor: int, data_range: float) -> tuple[float, float]:
    """(prior PSNR, linear PSNR) over the validation pairs, in standardised units."""
    net.eval()
    scores, linear = [], []
    for low, target in pairs:
        pred = net.coronal(low)[..., : target.shape[-1]]
        base = scripts.networks.han.linear_upsample_last(low, factor)[..., : target.shape[-1]]
        scores.append(psnr(pred, target, factor, data_range))
        linear.append(psnr(base, target, factor, data_range))
    net.train()
    return float(np.mean(scores)), float(np.mean(linear))


def pair_losses(net, iteration, planes: torch.Tensor, zplanes: torch.Tensor | None) -> torch.Tensor:
    """A step's objective on crops (N, 1, P, P): G_c's and G_s's in-plane pairs (the per-scan
    recipe's ``planar_inplane``, at scale 1: the crops are resampled already), plus the z-axis
    pairs of ``zplanes`` (M, 1, P, P), z last, when given."""
    volume = planes[..., None]  # (N, 1, P, P, 1): N axial slices
    loss = iteration.planar_inplane(net, "c", volume) + iteration.planar_inplane(net, "s", volume)
    if zplanes is not None:
        low, target = scripts.degradation.inplane_pair(zplanes, iteration.factor, iteration.slice_profile)
        loss = loss + iteration.internal_loss(net.coronal(low)[..., : target.shape[-1]], target)
    return loss


def default_threads() -> int:
    """The CPUs this process may run on (its affinity), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_utilisation(device: torch.device) -> float | None:
    """The GPU's utilisation (%) over NVML's last sample period, or None where NVML cannot be read."""
    if device.type != "cuda":
        return None
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # no pynvml, or NVML not readable in this machine
        return None


def default_bf16(device: torch.device) -> tuple[bool, str]:
    """bf16 autocast on CUDA; on a CPU where the planner's conv probe finds it faster than float32
    (a pretraining step ran 1.4x faster in bf16 on this project's 2-core Xeon with AVX512-BF16; a
    conv stack ran 8x slower on an EPYC without it: docs/PERFORMANCE.md)."""
    if device.type == "cuda":
        return True, "CUDA: bf16 autocast (tensor cores, fp32's exponent range)"
    precision, reason = decide_inference_precision(cuda=False)
    return precision == "bf16", f"the planner's CPU probe: {reason}"


def cosine_rate(lr: float, lr_min: float, elapsed_s: float, horizon_s: float) -> float:
    """The learning rate after ``elapsed_s`` of a cosine schedule over ``horizon_s`` (all leases)."""
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * min(elapsed_s / horizon_s, 1.0)))


def save_atomically(content: str | dict, path: Path) -> None:
    """Text, or torch.save of a dict, through a temporary file renamed onto ``path``: a lease ended
    mid-write leaves the last complete file."""
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(content, str):
        tmp.write_text(content)
    else:
        torch.save(content, tmp)
    os.replace(tmp, path)


def random_state(generator: torch.Generator, device: torch.device) -> dict:
    state = {"data": generator.get_state(), "torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_random_state(state: dict, generator: torch.Generator, device: torch.device) -> None:
    generator.set_state(state["data"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_checkpoint(path: Path, args: argparse.Namespace, factor: int) -> dict:
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(
            f"{path}: written by an earlier pretrain.py; continue its prior with --init_from instead"
        )
    for key, given in (("factor", factor), ("preset", args.preset), ("slice_profile", args.slice_profile)):
        if saved[key] != given:
            raise SystemExit(f"{path}: {key} {saved[key]!r}, this run's is {given!r}")
    return saved


def pretrain(args: argparse.Namespace, factor: int, volumes: dict, device: torch.device, out: Path) -> dict:
    """Train (or continue, ``--resume``) the prior for ``factor`` for one lease; returns its card."""
    torch.manual_seed(args.seed + factor)
    random.seed(args.seed + factor)
    generator = torch.Generator(device=device)
    generator.manual_seed(args.seed + factor)
    preset = PRESETS[args.preset]
    ckpt = out / f"prior_x{factor}.ckpt"
    saved = load_checkpoint(ckpt, args, factor) if args.resume and ckpt.exists() else None
    net = build_network(factor, preset, METHOD)
    if saved is not None:
        intensity = saved["intensity"]  # the run's standardisation, whatever data this lease has
    elif args.init_from is not None:  # continue an earlier prior (a fresh optimizer and schedule)
        net.load_state_dict(
            torch.load(args.init_from / f"prior_x{factor}.pt", map_location="cpu", weights_only=True)
        )
        intensity = json.loads((args.init_from / f"prior_x{factor}.json").read_text())["intensity"]
    else:
        intensity = intensity_statistics(volumes)
    window = [
        (intensity["clip_low"] - intensity["mean"]) / intensity["std"],
        (intensity["clip_high"] - intensity["mean"]) / intensity["std"],
    ]
    net.coronal.input_window = tuple(window)
    net = net.to(device)
    iteration = build_iteration(factor, 0, {**METHOD, "slice_profile": args.slice_profile})
    iteration.inplane_scale = 1.0  # the bank resamples each crop by its own scale
    lr = args.lr if args.lr is not None else preset.learning_rate
    optimizer = torch.optim.Adam(net.parameters(), lr, fused=device.type == "cuda")
    state = {
        "step": 0,
        "elapsed": 0.0,  # training seconds, all leases
        "schedule": {
            "lr": lr,
            "lr_min": args.lr_min,
            "total_minutes": args.total_minutes if args.total_minutes is not None else args.minutes,
        },
        "curve": [],
        "best": -math.inf,
        "leases": [],
    }
    best_weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if saved is not None:
        net.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        best_weights = {k: v.to(device) for k, v in saved["best_model"].items()}
        restore_random_state(saved["random"], generator, device)
        schedule = state["schedule"]
        if args.total_minutes is not None and args.total_minutes != schedule["total_minutes"]:
            print(
                f"x{factor}: the schedule's horizon moves from {schedule['total_minutes']:g} to "
                f"{args.total_minutes:g} minutes at {state['elapsed'] / 60:.1f}",
                flush=True,
            )
            schedule["total_minutes"] = args.total_minutes
        print(f"x{factor}: resumed at step {state['step']} ({state['elapsed']:.0f} s)", flush=True)
    schedule = state["schedule"]
    horizon_s = schedule["total_minutes"] * 60
    card_path = out / f"prior_x{factor}.json"
    if state["elapsed"] >= horizon_s:
        print(f"x{factor}: its {schedule['total_minutes']:g}-minute schedule is done; nothing to train")
        return json.loads(card_path.read_text())

    bank = PlaneBank(volumes, intensity, device, args.zpairs)
    bank.check_fits(args.patch, args.scale_range[1])
    pairs = bank.validation_pairs(factor, args.slice_profile)
    data_range = window[1] - window[0]
    log_scales = (math.log(args.scale_range[0]), math.log(args.scale_range[1]))
    bf16, bf16_reason = (
        (args.bf16, "given (--bf16 / --no-bf16)") if args.bf16 is not None else default_bf16(device)
    )

    def objective(planes: torch.Tensor, zplanes: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            return pair_losses(net, iteration, planes, zplanes)

    step_loss = torch.compile(objective) if args.compile else objective
    lease = {
        "lease": len(state["leases"]) + 1,
        "device": device_name(device),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": args.command,
        "first_step": state["step"],
        "steps": 0,
        "seconds": 0.0,
        "train_seconds": 0.0,
        "planes": args.planes,
        "patch": args.patch,
        "bf16": bf16,
        "bf16_reason": bf16_reason,
        "compile": args.compile,
        "threads": torch.get_num_threads(),
        "total_minutes": schedule["total_minutes"],
        "volumes": bank.names,
    }
    state["leases"].append(lease)
    context = {
        "args": args,
        "factor": factor,
        "out": out,
        "intensity": intensity,
        "preset": preset,
        "volumes": volumes,
        "bank": bank,
    }
    utilisation: list[float] = []  # GPU utilisation read at the log points
    running = torch.zeros((), device=device)  # the loss summed on the device between log points
    start = time.perf_counter()
    elapsed_before = state["elapsed"]
    next_validation = start if not state["curve"] else start + args.validate_every_s
    next_checkpoint = start + args.checkpoint_every_s
    overhead = 0.0  # validation and checkpoints: not training seconds
    last_log = (start, 0, 0.0)  # time, lease step, overhead
    net.train()
    while True:
        now = time.perf_counter()
        state["elapsed"] = elapsed_before + now - start
        finished = (
            now - start >= args.minutes * 60
            or state["elapsed"] >= horizon_s
            or (args.steps is not None and lease["steps"] >= args.steps)
        )
        if finished or now >= next_validation or now >= next_checkpoint:
            synchronize(device)  # the queued steps belong to the training time
            began = time.perf_counter()
            lease["seconds"] = round(began - start, 2)
            lease["train_seconds"] = round(began - start - overhead, 2)
            lease.update(throughput(lease, utilisation))
            if finished or now >= next_validation:
                score, linear = validate(net, pairs, factor, data_range)
                point = {"iteration": state["step"], "seconds": round(state["elapsed"], 1)}
                state["curve"].append(point | {"psnr": score, "linear": linear, "lease": lease["lease"]})
                if score > state["best"]:
                    state["best"] = score
                    best_weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
                    save_atomically(
                        {k: v.cpu() for k, v in best_weights.items()}, out / f"prior_x{factor}.pt"
                    )
                write_card(context, state)
                print(
                    f"x{factor} step {state['step']} {state['elapsed']:.0f}s val PSNR {score:.3f} dB "
                    f"(linear {linear:.3f}, +{score - linear:.3f})",
                    flush=True,
                )
                next_validation = time.perf_counter() + args.validate_every_s
            if finished or now >= next_checkpoint:
                checkpoint = {
                    "format": CHECKPOINT_FORMAT,
                    "factor": factor,
                    "preset": args.preset,
                    "slice_profile": args.slice_profile,
                    "intensity": intensity,
                    "model": net.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "best_model": best_weights,
                    "state": state,
                    "random": random_state(generator, device),
                }
                save_atomically(checkpoint, ckpt)
                next_checkpoint = time.perf_counter() + args.checkpoint_every_s
            overhead += time.perf_counter() - began
            if finished:
                break
        for group in optimizer.param_groups:
            group["lr"] = cosine_rate(schedule["lr"], schedule["lr_min"], state["elapsed"], horizon_s)
        planes = bank.draw(bank.axial, args.planes, args.patch, log_scales, generator)
        zplanes = None
        if bank.zplanes is not None:
            zplanes = bank.draw(bank.zplanes, args.planes, args.patch, (0.0, 0.0), generator, flips=False)
        loss = step_loss(planes, zplanes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += loss.detach()
        state["step"] += 1
        lease["steps"] += 1
        if lease["steps"] % args.log_every == 0:
            mean_loss = (
                float(running) / args.log_every
            )  # the host reads the loss here only (it waits for the GPU)
            running.zero_()
            value = gpu_utilisation(device)
            if value is not None:
                utilisation.append(value)
            now = time.perf_counter()
            then, steps_then, overhead_then = last_log
            rate = (lease["steps"] - steps_then) / max(now - then - (overhead - overhead_then), 1e-9)
            print(
                f"x{factor} step {state['step']} loss {mean_loss:.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                f"{rate:.2f} it/s {rate * args.planes:.0f} samples/s"
                + (f" GPU {value:.0f}%" if value is not None else ""),
                flush=True,
            )
            last_log = (now, lease["steps"], overhead)
    best = max(state["curve"], key=lambda c: c["psnr"])
    print(
        f"x{factor} lease {lease['lease']} on {lease['device']}: {lease['steps']} steps in {lease['seconds']:.0f} s "
        f"({lease['train_seconds']:.0f} s training): {lease['iterations_per_s']:.2f} it/s, "
        f"{lease['samples_per_s']:.0f} samples/s"
        + (
            f", GPU utilisation {lease['gpu_utilisation_percent']:.0f}%"
            if lease["gpu_utilisation_percent"] is not None
            else ""
        )
        + f"; best validation PSNR {best['psnr']:.3f} dB vs linear {best['linear']:.3f} "
        f"(+{best['psnr'] - best['linear']:.3f}) at step {best['iteration']}",
        flush=True,
    )
    return json.loads(card_path.read_text())


def throughput(lease: dict, utilisation: list[float]) -> dict:
    """The lease's iterations/s and samples/s (crops/s: each gives a G_c and a G_s pair) over its
    training seconds, and the mean GPU utilisation read at the log points (None without NVML)."""
    seconds = max(lease["train_seconds"], 1e-9)
    return {
        "iterations_per_s": round(lease["steps"] / seconds, 3),
        "samples_per_s": round(lease["steps"] * lease["planes"] / seconds, 1),
        "gpu_utilisation_percent": round(float(np.mean(utilisation)), 1) if utilisation else None,
    }


def command_line(argv: list[str]) -> str:
    return "python benchmarks/pretrain.py " + " ".join(shlex.quote(a) for a in argv)


def write_card(context: dict, state: dict) -> dict:
    """``prior_x{r}.json``, the card of the best weights so far (``prior_x{r}.pt``), rewritten at every
    validation from the run's state: every lease and the whole validation curve, so that a run
    stopped at any time leaves its best prior and its history."""
    args, factor, preset, bank = context["args"], context["factor"], context["preset"], context["bank"]
    volumes = context["volumes"]
    best = max(state["curve"], key=lambda c: c["psnr"])
    devices = list(dict.fromkeys(lease["device"] for lease in state["leases"]))
    shared = any(Path(v.source).parent == args.data for v in volumes.values())
    card = {
        "factor": factor,
        "recipe": RECIPE,
        "method": METHOD,
        "preset": args.preset,
        "architecture": {"axial": preset.axial, "planar": preset.planar},
        "intensity": context["intensity"],
        "slice_profile": args.slice_profile,
        "scale_range": list(args.scale_range),
        "zpairs": bool(bank.zpair_volumes),
        "data": {
            name: {
                "shape": list(v.array.shape),
                "spacing_mm": [round(s, 4) for s in v.spacing],
                "source": v.source if Path(v.source).parent != args.data else Path(v.source).name,
                **(v.record or {}),
            }
            for name, v in volumes.items()
        },
        "left_out": list(args.leave_out),
        "data_licence": DATA_LICENCE if shared else None,
        "data_dirs": [str(d) for d in args.data_dir],
        "iterations": state["step"],
        "seconds": round(state["elapsed"], 1),
        "device": ", ".join(devices),
        "schedule": {
            "what": "Adam; cosine learning rate from lr to lr_min over total_minutes of training, "
            "summed over the leases",
            **state["schedule"],
        },
        "leases": state["leases"],
        "validation": {
            "what": "held-out axial slices (every 8th), in-plane pairs at scale 1, synthesized columns, "
            "standardised units over the intensity window",
            "best": best,
            "curve": state["curve"],
        },
        "command": args.command,
        "continued_from": previous_card(args, factor),
    }
    path = context["out"] / f"prior_x{factor}.json"
    save_atomically(json.dumps(card, indent=1) + "\n", path)
    return card


def previous_card(args, factor: int) -> dict | None:
    """The card of the prior this run continued (``--init_from``), without its curve."""
    if args.init_from is None:
        return None
    card = json.loads((args.init_from / f"prior_x{factor}.json").read_text())
    card["validation"] = {"best": card["validation"]["best"]}
    return card


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding the shared CT volumes")
    parser.add_argument(
        "--data_dir",
        type=Path,
        action="append",
        default=[],
        help="a folder of .nii.gz CT volumes to train on as well (repeatable); each is named by its file",
    )
    parser.add_argument("--factors", nargs="+", type=int, default=[2, 3, 4, 5, 6])
    parser.add_argument("--minutes", type=float, default=60.0, help="training time per factor in this run")
    parser.add_argument(
        "--total_minutes",
        type=float,
        default=None,
        help="the learning-rate schedule's horizon: training minutes per factor over all runs (--resume); "
        "default: --minutes; stored in the checkpoint",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="stop this run after this many steps per factor"
    )
    parser.add_argument(
        "--leave_out", nargs="*", default=[], help=f"volumes to leave out, e.g. {list(VOLUMES)}"
    )
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument(
        "--planes",
        type=int,
        default=None,
        help=f"axial crops per step, each gives a c and an s pair (default by device: {DEFAULT_PLANES})",
    )
    parser.add_argument("--patch", type=int, default=96, help="crop size after resampling (pixels)")
    parser.add_argument("--scale_range", nargs=2, type=float, default=[0.5, 1.25])
    parser.add_argument("--slice_profile", default="removal", choices=scripts.degradation.PROFILES)
    parser.add_argument("--zpairs", action="store_true", help="also train on the isotropic volumes' z-axis")
    parser.add_argument("--lr", type=float, default=None, help="Adam's starting rate (default: the preset's)")
    parser.add_argument("--lr_min", type=float, default=1e-5)
    parser.add_argument("--validate_every_s", type=float, default=30.0)
    parser.add_argument("--checkpoint_every_s", type=float, default=60.0)
    parser.add_argument("--log_every", type=int, default=50, help="steps between reads of the loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=default_threads(), help="torch threads (default: the CPU affinity)"
    )
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: on CUDA; on a CPU where a conv probe runs it faster than float32)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the step's objective")
    parser.add_argument("--resume", action="store_true", help="continue from prior_x{r}.ckpt in --out")
    parser.add_argument(
        "--init_from", type=Path, default=None, help="a folder of earlier priors to continue training from"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder; {r} in it is replaced by the factor"
    )
    args = parser.parse_args(argv)
    args.command = command_line(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.planes is None:
        args.planes = DEFAULT_PLANES[device.type]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every step has the same shapes
    volumes = load_volumes(args.data, args.data_dir, args.leave_out)
    for factor in args.factors:
        out = Path(str(args.out).replace("{r}", str(factor)))
        out.mkdir(parents=True, exist_ok=True)
        pretrain(args, factor, volumes, device, out)


if __name__ == "__main__":
    main()
