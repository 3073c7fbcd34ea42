"""`icmd_auto pretrain`: a CT prior from an archive of scans, thick or thin, with no thin ground truth.

A prior is the ``inplane`` recipe's network (one G_c = G_s, coronal/sagittal mean) trained once on
many volumes, so that a scan needs no training (zero-shot ``predict``) or only a short fine-tune
(``plan --init prior``). It learns from the pairs per-scan training makes, on every volume given:

- in-plane pairs: axial crops resampled to a random scale (in-plane spacing / target slice spacing,
  drawn per crop from ``--scale_range`` so that one prior serves scans of any spacing) by the
  bundle's one resampler (``degradation.resampling_taps``), degraded by r along x or y
  (``ICMDIteration.planar_inplane``, the per-scan recipe's objective);
- thin supervision (``--thin``, on by default): where a volume's slices are thin (z-spacing at most
  ``THIN_MAX_MM``), its coronal and sagittal planes degraded by r along the true z-axis, predicted
  back: the thick-to-thin mapping itself, at its real spacing.

Validation holds out a central slab of every volume's slices (anatomy, not the ends of the scan)
from all training crops, in-plane and along z; its score is the bundle's validation (pairs made as
in training, PSNR on the evaluation protocol's HU scale, synthesized positions only) against linear
interpolation, and along z on the thin volumes. Volumes named by ``--leave_out`` never train; they
score the run as a user's scan would be scored, along their real z-axes made thick by slice removal,
and the card's assessment judges by them (more hours, more data or a larger network next). The
weights written are the last step's (``--keep last``, the default) or the best by the in-plane
score (``--keep best``): twice that score stayed flat while the z-axes of held-out volumes improved
(docs/RESULTS.md).

Runs are built to last hours across sessions and machines:

- the schedule is in steps: ``--hours`` becomes a step count from a timed probe on the first run, the
  cosine learning rate and the validation points follow the step, so a run killed and continued
  with ``--resume`` trains exactly the weights of an uninterrupted seeded run (on the same device
  and thread count);
- a checkpoint every ``--checkpoint_every_s`` (``prior_x{r}.ckpt`` in ``--out``: model, optimizer,
  step, random state, curve): a kill loses at most that much; each run appends a lease to the card
  (command, device, threads, steps, throughput, CPU-hours);
- ``--init_from PRIOR_DIR`` continues the weights of another prior folder (the shipped priors on a
  new machine) on a new schedule; the card keeps the earlier one's history and CPU-hours.

Writes ``prior_x{r}.pt`` (the best weights), ``prior_x{r}.json`` (the card: architecture, intensity
standardisation, each volume with its licence, the leases, the validation curve and what it says)
to ``--out``; ``predict --prior DIR`` and ``plan --init prior --prior DIR`` take the folder.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import math
import os
import random
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .dataset import read_dataset_json
from .errors import ICMDError
from .fingerprint import (
    CaseReadError,
    intensity_standardisation,
    intensity_window,
    pooled_intensity,
    sample_voxels,
)
from .integrity import DatasetIntegrityError, check_image
from .planner import PRESETS, RECIPES, build_iteration, build_network, decide_inference_precision
from .template import scripts
from .timing import autocast, cpu_cores

logger = logging.getLogger("icmd_auto.pretrain")

RECIPE = "inplane"
THIN_MAX_MM = 1.5  # z-spacing at most this: the volume's own z-axis gives thick-to-thin pairs
Z_CROP_MIN_THICK = 4  # a thick-to-thin crop along z spans at least this many thick slices
VALIDATION_SHARE = 0.1  # the central tenth of a volume's slices (at least 2r + 1) is validation only
VALIDATION_SLICES = 2  # held-out axial slices scored per volume (in-plane), spread over its slab
VALIDATION_PLANES = 2  # held-out coronal and sagittal planes scored per thin volume (along z)
VALIDATION_CROP = 96  # pixels: the centre crop scored (the validation stays a few % of training)
# a --leave_out volume scores the run along its real z-axis (thick by slice removal, as the benchmarks
# make it): coronal and sagittal planes through a centre crop, every slice the thick grid covers
LEFT_OUT_PLANES = 16  # planes of each view per left-out volume
LEFT_OUT_CROP = 160  # pixels
VALIDATION_POINTS = 50  # validations over a schedule (and one before the first step)
# planes per step by device: 32 on a CPU (0.4-0.6 s a step on 2 cores); 256 on a GPU (a plane's saved
# activations are ~10 MB in bf16 at patch 96, small preset, x4; docs/PERFORMANCE.md)
DEFAULT_PLANES = {"cpu": 32, "cuda": 256}
PROBE_STEPS = (2, 4)  # untimed warm-up and timed steps of the probe that turns --hours into steps
CHECKPOINT_FORMAT = 3
FLAT_GAIN_DB = 0.05  # the last third of a curve gained less than this: flat
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class Volume:
    array: np.ndarray  # (X, Y, Z) float32, HU
    spacing: tuple[float, float, float]  # mm
    source: str  # file or folder name (never a path of this machine)
    record: dict = field(default_factory=dict)  # licence, attribution, ... (sources.json / dataset.json)

    @property
    def thin(self) -> bool:
        return self.spacing[2] <= THIN_MAX_MM


# ----------------------------------------------------------------------------------------------- data


def volume_name(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def images_in(folder: Path) -> list[Path]:
    """A folder's images: its NIfTI files and its subfolders (DICOM series, one each), or the folder
    itself where it holds DICOM files directly."""
    if not folder.is_dir():
        raise ICMDError(f"--data_dir {folder}: not a folder")
    entries = sorted(folder.iterdir())
    nifti = [p for p in entries if p.is_file() and p.name.endswith(NIFTI_SUFFIXES)]
    folders = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    if not nifti and not folders and any(p.suffix.lower() == ".dcm" for p in entries):
        return [folder]
    if not nifti and not folders:
        raise ICMDError(f"--data_dir {folder}: no NIfTI files or DICOM series folders in it")
    return nifti + folders


def source_records(folder: Path) -> dict[str, dict]:
    """``folder/sources.json`` by file name (benchmarks/fetch_ct.py writes it: licence, attribution,
    repository of each series); empty where the folder has none."""
    path = folder / "sources.json"
    if not path.is_file():
        return {}
    series = json.loads(path.read_text()).get("series", [])
    return {e["file"]: {k: v for k, v in e.items() if k not in ("file", "name")} for e in series}


def dataset_records(path: Path) -> dict[str, dict]:
    """Per-image extra keys of a dataset.json's training entries ("licence", "attribution", ...)."""
    raw = json.loads(path.read_text())
    records = {}
    for entry in raw.get("training", []):
        if isinstance(entry, dict):
            image = Path(entry["image"])
            image = image if image.is_absolute() else path.parent / image
            records[str(image)] = {k: v for k, v in entry.items() if k not in ("image", "series")}
    return records


def list_images(dataset: Path | None, data_dirs: list[Path]) -> tuple[list[Path], dict, dict]:
    """The images to pretrain on, their records (licences) and the series named per image."""
    images, records, series = [], {}, {}
    if dataset is not None:
        spec = read_dataset_json(dataset)
        images += spec.training
        records.update(dataset_records(spec.path))
        series.update(spec.entry_series)
    for folder in data_dirs:
        found = images_in(folder)
        images += found
        records.update({str(folder / f): r for f, r in source_records(folder).items()})
    if not images:
        raise ICMDError("nothing to pretrain on: give --dataset or --data_dir")
    return images, records, series


def load_volumes(
    images: list[Path], records: dict, series: dict, factor: int, skip_bad: bool, leave_out: list[str]
) -> tuple[dict[str, Volume], dict[str, Volume]]:
    """Every image read and checked: (the volumes to train on, the ``leave_out`` ones, which only
    score the run along their real z-axes); all problems at once, one line per volume (as ``plan``),
    or with ``skip_bad`` each bad one named and left out."""
    volumes, left_out, problems, seen = {}, {}, [], {}
    needed = 2 * factor + 2  # training slices either side of the validation slab
    for path in images:
        name = volume_name(path)
        if name in seen:
            problems.append(f"{path}: its name {name!r} is also {seen[name]}'s; rename one")
            continue
        seen[name] = path
        uid = series.get(str(path))
        try:
            _, array, affine = check_image(
                path, needed, "pretraining", series=(uid,) if uid else (), strict=bool(uid)
            )
        except CaseReadError as e:
            if name in leave_out:  # it would only have scored the run
                logger.warning("--leave_out %s: not scored: %s", name, e)
            else:
                problems.append(str(e))
            continue
        spacing = tuple(float(s) for s in scripts.io.voxel_spacing(affine))
        volume = Volume(array.astype(np.float32), spacing, path.name, records.get(str(path), {}))
        (left_out if name in leave_out else volumes)[name] = volume
    unknown = set(leave_out) - set(seen)
    if unknown:
        problems.append(f"--leave_out {sorted(unknown)}: no such volume")
    if problems and not skip_bad:
        raise DatasetIntegrityError("pretraining data", problems)
    for problem in problems:
        logger.warning("left out: %s", problem)
    if not volumes:
        raise ICMDError("no volume left to pretrain on")
    return volumes, left_out


def intensity_statistics(volumes: dict[str, Volume]) -> dict:
    """The planner's intensity standardisation (nnU-Net's CTNormalization: pooled 0.5 / 99.5
    percentiles, clipped mean and std: ``fingerprint.intensity_standardisation``) over the
    pretraining set, as the card and a warm start's bundle store it."""
    return intensity_standardisation(
        pooled_intensity([sample_voxels(v.array, seed=i) for i, v in enumerate(volumes.values())])
    )


def validation_slab(depth: int, factor: int) -> tuple[int, int]:
    """[start, stop) of the held-out central slices: a tenth of them, at least 2r + 1 (so that a
    thin volume's z-axis holds a pair), never more than a third."""
    size = min(max(int(round(depth * VALIDATION_SHARE)), 2 * factor + 1), max(depth // 3, 1))
    start = (depth - size) // 2
    return start, start + size


# ------------------------------------------------------------------------------------------ the bank


def z_crop_size(volumes: dict[str, Volume], factor: int, size: int) -> int:
    """The side of the thick-to-thin crops along z: ``size`` (the in-plane crops') where a thin
    volume's slices allow, else the longest run of slices on either side of a validation slab,
    rounded down to a multiple of r (a 112-slice 1.5 mm chest: 48 at x4); 0 where no thin volume
    holds a crop of at least Z_CROP_MIN_THICK thick slices."""
    longest = 0
    for volume in volumes.values():
        if volume.thin:
            x, y, z = volume.array.shape
            start, stop = validation_slab(z, factor)
            longest = max(longest, min(max(start, z - stop), x, y))
    side = min(size, longest) // factor * factor
    return side if side >= Z_CROP_MIN_THICK * factor else 0


@dataclass
class PlaneTable:
    """Planes of a ``PlaneBank``'s flat tensor, one row each (int64 tensors on the device): the flat
    index of pixel (0, 0), height and width (pixels), the flat strides along height and width, and
    ``cdf``, the cumulative pick probability (a plane is picked in proportion to its pixels)."""

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

    ``axial``: every volume's axial slices (X, Y) outside its validation slab; ``zplanes``: the
    coronal (X, Z) and sagittal (Y, Z) planes of the thin volumes, z last, cut at the slab into the
    part below and the part above it (no crop ever reads a held-out slice), cropped ``zsize``
    pixels square (``z_crop_size``); parts shorter than that are left out. ``draw`` makes a batch of crops with tensor ops only (no host sync).
    """

    def __init__(
        self,
        volumes: dict[str, Volume],
        intensity: dict,
        factor: int,
        device: torch.device,
        thin: bool,
        size: int,
    ):
        mean, std = intensity["mean"], intensity["std"]
        self.flat = torch.cat(
            [torch.from_numpy((v.array - mean) / std).reshape(-1) for v in volumes.values()]
        ).to(device)
        self.volumes: dict[str, torch.Tensor] = {}  # (X, Y, Z) views into ``flat``
        self.slabs: dict[str, tuple[int, int]] = {}
        self.thin_volumes: list[str] = []
        self.zsize = z_crop_size(volumes, factor, size) if thin else 0
        axial, zrows, offset = [], [], 0
        for name, volume in volumes.items():
            x, y, z = volume.array.shape
            self.volumes[name] = self.flat[offset : offset + x * y * z].view(x, y, z)
            start, stop = self.slabs[name] = validation_slab(z, factor)
            axial += [(offset + k, x, y, y * z, z) for k in range(z) if not start <= k < stop]
            if self.zsize and volume.thin and min(x, y) >= self.zsize:
                parts = [(a, b) for a, b in ((0, start), (stop, z)) if b - a >= self.zsize]
                for a, b in parts:
                    zrows += [(offset + j * z + a, x, b - a, y * z, 1) for j in range(y)]  # coronal
                    zrows += [(offset + i * y * z + a, y, b - a, z, 1) for i in range(x)]  # sagittal
                if parts:
                    self.thin_volumes.append(name)
            offset += x * y * z
        self.axial = PlaneTable.of(axial, device)
        self.zplanes = PlaneTable.of(zrows, device) if self.thin_volumes else None
        self.names = list(volumes)

    def too_small(self, size: int, max_scale: float) -> list[str]:
        """Volumes whose axial slices cannot hold a crop of ``size`` pixels at the largest scale."""
        return [
            f"{name}: axial slices of {v.shape[0]} x {v.shape[1]} pixels are too small for --patch {size} at "
            f"the largest scale {max_scale}"
            for name, v in self.volumes.items()
            if min(v.shape[0], v.shape[1]) * max_scale < size
        ]

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
        the 8 flips/transposes.
        """
        u = torch.rand(5, n, generator=generator, device=self.flat.device)
        rows = torch.searchsorted(table.cdf, u[0]).clamp_(max=len(table) - 1)
        dims = torch.stack([table.height[rows], table.width[rows]], 1).float()  # (n, 2)
        low, high = log_scales
        scales = torch.exp(low + (high - low) * u[1]).maximum(size / dims.min(1).values)
        step = scales.reciprocal()
        extent = (size - 1) * step + 2 * scripts.degradation.area_half_width(step)
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
        """(N, 1, size, size): crop k of plane ``rows[k]``, its first source sample at pixel
        ``corners[k]`` (h, w), resampled by ``scales[k]`` with ``degradation.resampling_taps`` (per-scan
        training's resampler), then transposed (``codes`` bit 4) and flipped along h (bit 1) and w
        (bit 2), in that order. One gather for the whole batch."""
        n = rows.shape[0]
        step = scales.reciprocal()
        taps, weights = scripts.degradation.resampling_taps(
            corners.reshape(-1), step.repeat_interleave(2), size
        )
        taps, weights = taps.view(n, 2, size, 4), weights.view(n, 2, size, 4)
        # a sample on a plane's last pixel has its upper tap outside the plane, with weight 0; a grid
        # that starts before the plane (a whole plane enlarged, centred) repeats its edge, as per-scan training's
        limit = torch.stack([table.height[rows], table.width[rows]], 1)[:, :, None, None] - 1
        strides = torch.stack([table.stride_h[rows], table.stride_w[rows]], 1)[:, :, None, None]
        offsets = taps.clamp(min=0).minimum(limit) * strides
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

    def validation_items(self) -> list[tuple[str, str, torch.Tensor]]:
        """What the validation scores, from the held-out slabs only: (volume, kind, tensor), kind
        "inplane" with held-out axial slices (1, 1, P, P, n) for the bundle's in-plane pairs, kind "z"
        with coronal and sagittal planes of a thin volume's slab (N, 1, P, n), z last."""
        items = []
        for name, v in self.volumes.items():
            x, y, _ = v.shape
            start, stop = self.slabs[name]
            p = min(VALIDATION_CROP, x, y)
            a, b = (x - p) // 2, (y - p) // 2
            picks = np.linspace(start, stop - 1, VALIDATION_SLICES + 2)[1:-1].round().astype(int)
            items.append((name, "inplane", v[a : a + p, b : b + p, picks][None, None].clone()))
            if name in self.thin_volumes:
                planes = crossing_planes(v, a, b, p, VALIDATION_PLANES, slice(start, stop))
                items.append((name, "z", planes.clone()))
        return items


def crossing_planes(v: torch.Tensor, a: int, b: int, p: int, count: int, zs: slice) -> torch.Tensor:
    """(2 * count, 1, p, len(zs)): ``count`` coronal then ``count`` sagittal planes of ``v`` (X, Y, Z)
    through its p x p crop at (a, b), evenly spread inside it (its edges left out), z last."""
    js = np.linspace(b, b + p - 1, count + 2)[1:-1].round().astype(int)
    coronal = v[a : a + p, js, zs].permute(1, 0, 2)
    sagittal = v[np.linspace(a, a + p - 1, count + 2)[1:-1].round().astype(int), b : b + p, zs]
    return torch.cat([coronal, sagittal])[:, None]


def left_out_items(
    left_out: dict[str, Volume], intensity: dict, factor: int, device: torch.device
) -> list[tuple[str, str, torch.Tensor]]:
    """What the left-out volumes score, along their real z-axes: (volume, "left_out", planes), the
    planes (2 * LEFT_OUT_PLANES, 1, P, n) coronal and sagittal through the centre P x P crop
    (LEFT_OUT_CROP at most), z last, over the n slices that slice removal by r covers; validation
    thickens them by r and scores the synthesized positions, as the benchmarks score a zero-shot
    prediction of the whole volume (there, the coronal/sagittal mean of every plane)."""
    items = []
    for name, volume in left_out.items():
        x, y, z = volume.array.shape
        n = scripts.degradation.covered(z, factor)
        if n <= factor:
            logger.warning("--leave_out %s: %d slices hold no pair at x%d; not scored", name, z, factor)
            continue
        p = min(LEFT_OUT_CROP, x, y)
        a, b = (x - p) // 2, (y - p) // 2
        v = torch.from_numpy((volume.array - intensity["mean"]) / intensity["std"])
        planes = crossing_planes(v, a, b, p, LEFT_OUT_PLANES, slice(0, n))
        items.append((name, "left_out", planes.contiguous().to(device)))
    return items


# ------------------------------------------------------------------------------------- the objective


class LinearViews:
    """Linear interpolation along the last axis in a network's place (validation's baseline)."""

    def __init__(self, factor: int):
        self.factor = factor

    def view_network(self, view: str):
        return lambda low: scripts.networks.han.linear_upsample_last(low, self.factor)


def validate(net, items, validation, factor: int) -> dict:
    """The held-out slabs' PSNR (dB, the evaluation protocol's HU scale, synthesized positions) of
    the network and of linear interpolation: in-plane pairs made and scored by the bundle's
    validation (``SelfSupervisedValidation.inplane``) for both views ("psnr", "linear"); along z on
    the thin volumes' slabs ("z_psnr", "z_linear") and on the left-out volumes ("held_out_psnr",
    "held_out_linear"). Each score is the mean over volumes (and views) of the pooled PSNR of one
    volume's planes."""
    net.eval()
    scores: dict[str, list[float]] = {}
    along_z = {"z": "z_", "left_out": "held_out_"}
    syn_cache: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for _, kind, tensor in items:
            for key, model in (("psnr", net), ("linear", LinearViews(factor))):
                if kind == "inplane":
                    for view in ("c", "s"):
                        pred, target = validation.inplane(model, view, tensor)
                        scores.setdefault(key, []).append(evaluation_psnr(validation, pred, target))
                else:
                    low, target = scripts.degradation.inplane_pair(tensor, factor, validation.slice_profile)
                    pred = model.view_network("c")(low)[..., : target.shape[-1]]
                    length = target.shape[-1]
                    syn = syn_cache.setdefault(length, scripts.degradation.synthesized_mask(length, factor))
                    score = evaluation_psnr(validation, pred[..., syn], target[..., syn])
                    scores.setdefault(along_z[kind] + key, []).append(score)
    net.train()
    return {k: round(float(np.mean(v)), 4) for k, v in scores.items()}


def evaluation_psnr(validation, pred: torch.Tensor, target: torch.Tensor) -> float:
    return scripts.evaluation.psnr(validation.unit(pred), validation.unit(target))


def pair_losses(net, iteration, planes: torch.Tensor, zplanes: torch.Tensor | None) -> torch.Tensor:
    """A step's objective on crops (N, 1, P, P): G_c's and G_s's in-plane pairs (the per-scan
    recipe's ``planar_inplane``, at scale 1: the crops are resampled already), plus the thick-to-thin
    pairs of ``zplanes`` (M, 1, P, P), z last, when given (G_c = G_s: one network)."""
    volume = planes[..., None]  # (N, 1, P, P, 1): N axial slices
    loss = iteration.planar_inplane(net, "c", volume) + iteration.planar_inplane(net, "s", volume)
    if zplanes is not None:
        low, target = scripts.degradation.inplane_pair(zplanes, iteration.factor, iteration.slice_profile)
        loss = loss + iteration.internal_loss(net.coronal(low)[..., : target.shape[-1]], target)
    return loss


def cosine_rate(lr: float, lr_min: float, step: int, total: int) -> float:
    """The learning rate at ``step`` of a cosine schedule over ``total`` steps (all leases)."""
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))


# ------------------------------------------------------------------------------------------- the run


def save_weights(net, reparam: bool, path: Path) -> None:
    """The prior file: ``net``'s weights as the plain network's (folded where trained ``--reparam``)."""
    weights = scripts.networks.reparam.folded_state_dict(net) if reparam else net.state_dict()
    save_atomically({k: v.detach().cpu().clone() for k, v in weights.items()}, path)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def save_atomically(content: str | dict, path: Path) -> None:
    """Text, or torch.save of a dict, through a temporary file renamed onto ``path``: a run killed
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


def command_line(argv: list[str]) -> str:
    """The command as the card records it: path arguments by their last component (a card names no
    folder of the machine it was made on)."""
    paths = {"--dataset", "--data_dir", "--out", "--init_from"}
    words, previous = [], None
    for word in argv:
        words.append(Path(word).name if previous in paths else word)
        previous = word
    return "icmd_auto pretrain " + " ".join(shlex.quote(w) for w in words)


@dataclass
class PretrainOptions:
    factor: int
    out: Path
    hours: float | None = 1.0
    steps: int | None = None  # the schedule's total steps (instead of --hours)
    stop_after: int | None = None  # steps this run trains at most (a lease)
    lease_minutes: float | None = None  # wall-clock minutes this run trains at most (a lease)
    dataset: Path | None = None
    data_dirs: list[Path] = field(default_factory=list)
    leave_out: list[str] = field(default_factory=list)
    skip_bad: bool = False
    preset: str = "small"
    planes: int | None = None
    patch: int = 96
    scale_range: tuple[float, float] = (0.5, 1.25)
    slice_profile: str = "removal"
    thin: bool = True
    lr: float | None = None
    lr_min: float = 1e-5
    checkpoint_every_s: float = 60.0
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    bf16: bool | None = None
    resume: bool = False
    init_from: Path | None = None
    # train the 3x3 convolutions re-parameterised (networks/reparam.py), write them folded
    reparam: bool = False
    # the weights prior_x{r}.pt holds: "best" by the held-out validation, or the "last" step's
    keep: str = "last"
    progress: bool | None = None  # a bar (terminal) or plain lines; None: by whether stderr is a terminal
    command: str = "icmd_auto pretrain"


def probe_seconds_per_step(net, iteration, bank, opts, log_scales, use_bf16: bool, device) -> float:
    """Median seconds of a training step (validation and checkpoints are a few % on top), timed on
    copies: the run's weights, optimizer and random streams are untouched."""
    net = copy.deepcopy(net)
    optimizer = torch.optim.Adam(net.parameters(), 1e-5)
    generator = torch.Generator(device=device).manual_seed(12345)
    times = []
    warmup, timed = PROBE_STEPS
    cpu_state = torch.get_rng_state()
    for step in range(warmup + timed):
        synchronize(device)
        start = time.perf_counter()
        one_step(net, iteration, bank, opts, log_scales, generator, optimizer, use_bf16, device)
        synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    torch.set_rng_state(cpu_state)
    return statistics.median(times)


def one_step(net, iteration, bank, opts, log_scales, generator, optimizer, use_bf16, device) -> torch.Tensor:
    planes = bank.draw(bank.axial, opts.planes, opts.patch, log_scales, generator)
    zplanes = None
    if bank.zplanes is not None:
        zplanes = bank.draw(bank.zplanes, opts.planes, bank.zsize, (0.0, 0.0), generator, flips=False)
    with autocast(device, use_bf16):
        loss = pair_losses(net, iteration, planes, zplanes)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def pretrain(opts: PretrainOptions) -> dict:
    """Train (or continue) the prior for ``opts.factor`` in ``opts.out``; returns its card."""
    device = torch.device(opts.device)
    threads = opts.threads or cpu_cores()
    torch.set_num_threads(threads)
    opts.planes = opts.planes or DEFAULT_PLANES[device.type]
    factor, out = opts.factor, Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / f"prior_x{factor}.ckpt"
    if opts.resume and not ckpt.is_file():  # as nnU-Net's --c: a lease script's first run starts the run
        logger.warning("--resume: no %s in %s yet; starting the run", ckpt.name, out)
        opts.resume = False
    if not opts.resume and ckpt.is_file():
        raise ICMDError(
            f"{out} holds a run ({ckpt.name}): continue it with --resume, or choose another --out"
        )

    images, records, series = list_images(opts.dataset, opts.data_dirs)
    volumes, left_out = load_volumes(images, records, series, factor, opts.skip_bad, opts.leave_out)
    logger.info(
        "x%d: %d volumes, %d thin (z-spacing <= %g mm)",
        factor,
        len(volumes),
        sum(v.thin for v in volumes.values()),
        THIN_MAX_MM,
    )
    preset = PRESETS[opts.preset]
    method = RECIPES[RECIPE]
    torch.manual_seed(opts.seed + factor)  # the network's initial weights
    net = build_network(factor, preset, method)
    # the bank resamples each crop by its own scale: the pairs are made at scale 1
    iteration = build_iteration(
        factor, 0, {**method, "slice_profile": opts.slice_profile, "inplane_scale": 1.0}
    )
    generator = torch.Generator(device=device).manual_seed(opts.seed + factor)
    torch.manual_seed(opts.seed + factor)
    random.seed(opts.seed + factor)

    previous = None
    if opts.init_from is not None and not opts.resume:
        previous = continued_card(opts.init_from, factor)
        weights = opts.init_from / f"prior_x{factor}.pt"
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    if opts.reparam:  # before a checkpoint's weights, which are the expanded network's
        for view in {net.coronal, net.sagittal} - {None}:
            scripts.networks.reparam.expand(view)
    if opts.resume:
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        if saved.get("format") != CHECKPOINT_FORMAT:
            raise ICMDError(
                f"{ckpt}: written by another version; continue its prior with --init_from instead"
            )
        for key, given in (
            ("factor", factor),
            ("preset", opts.preset),
            ("slice_profile", opts.slice_profile),
            ("reparam", opts.reparam),
        ):
            if saved.get(key, False) != given:
                raise ICMDError(f"--resume: {ckpt.name} was trained with {key} {saved[key]!r}, not {given!r}")
        intensity, state = saved["intensity"], saved["state"]
        if sorted(state["volumes"]) != sorted(volumes):
            raise ICMDError(
                f"--resume: the data differ from the run's ({len(state['volumes'])} volumes then, {len(volumes)} now); "
                "a prior continues on the data it started with (or start anew with --init_from)"
            )
        net.load_state_dict(saved["model"])
    else:
        intensity = intensity_statistics(volumes)
        if previous is not None:
            intensity = previous["intensity"]  # its weights expect it
        state = {
            "step": 0,
            "total_steps": None,
            "validate_every": None,
            "seconds": 0.0,
            "cpu_seconds": 0.0,
            "best": -math.inf,
            "curve": [],
            "leases": [],
            "volumes": list(volumes),
            "lr": opts.lr or preset.learning_rate,
            "lr_min": opts.lr_min,
            "continued_from": previous,
        }
    for view in {net.coronal, net.sagittal} - {None}:
        view.input_window = intensity_window(intensity)
    net = net.to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=state["lr"], fused=device.type == "cuda")
    best_weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if opts.resume:
        optimizer.load_state_dict(saved["optimizer"])
        best_weights = saved["best_model"]
        restore_random_state(saved["random"], generator, device)

    bank = PlaneBank(volumes, intensity, factor, device, opts.thin, opts.patch)
    if bank.thin_volumes:
        logger.info(
            "x%d: thick-to-thin pairs along z of %s (crops of %d x %d)",
            factor,
            ", ".join(bank.thin_volumes),
            bank.zsize,
            bank.zsize,
        )
    small = bank.too_small(opts.patch, opts.scale_range[1])
    if small:
        raise DatasetIntegrityError("pretraining data", small)
    items = bank.validation_items() + left_out_items(left_out, intensity, factor, device)
    scored = [name for name, kind, _ in items if kind == "left_out"]
    if scored:
        logger.info("x%d: scored along the real z-axes of the left-out %s", factor, ", ".join(scored))
    validation = scripts.validation.SelfSupervisedValidation(
        factor, "mean_cs", intensity["mean"], intensity["std"], opts.slice_profile
    )
    log_scales = (math.log(opts.scale_range[0]), math.log(opts.scale_range[1]))
    use_bf16, bf16_reason = (opts.bf16, "given") if opts.bf16 is not None else default_bf16(device)

    lease = {
        "lease": len(state["leases"]) + 1,
        "device": device_name(device),
        "machine": machine_kind(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": opts.command,
        "first_step": state["step"],
        "steps": 0,
        "train_seconds": 0.0,
        "threads": threads,
        "planes": opts.planes,
        "bf16": use_bf16,
        "bf16_reason": bf16_reason,
    }
    replan = (
        state["total_steps"] is None
        or (opts.steps is not None and opts.steps != state["total_steps"])
        or (opts.steps is None and opts.hours is not None and opts.hours != state.get("hours"))
    )
    if replan:  # the first run, or a resume that changes the schedule (a resume that does not: exact)
        seconds = probe_seconds_per_step(net, iteration, bank, opts, log_scales, use_bf16, device)
        lease["probe_seconds_per_step"] = round(seconds, 4)
        if opts.steps is not None:
            total = opts.steps
        else:  # the hours left at the probe's rate
            total = state["step"] + max(int((opts.hours * 3600 - state["seconds"]) / seconds), 1)
        if state["total_steps"] is not None:
            logger.info("x%d: schedule %d -> %d steps", factor, state["total_steps"], total)
        else:  # in steps, not seconds: the curve's points do not depend on the machine's load
            state["validate_every"] = max(total // VALIDATION_POINTS, 1)
        state["total_steps"], state["hours"] = total, opts.hours if opts.steps is None else None
    total = state["total_steps"]
    context = {"opts": opts, "intensity": intensity, "preset": preset, "volumes": volumes, "bank": bank}
    if state["step"] >= total:  # no lease: nothing trains
        logger.info("x%d: its %d-step schedule is done; nothing to train", factor, total)
        if opts.keep == "last":  # the run's final weights, e.g. of a run that kept its best
            save_weights(net, opts.reparam, out / f"prior_x{factor}.pt")
        return write_card(context, state)
    state["leases"].append(lease)

    bar = progress_bar(opts.progress, total, state["step"], f"x{factor}")
    start = time.perf_counter()
    process_start = time.process_time()
    seconds_before, cpu_before = state["seconds"], state["cpu_seconds"]
    next_checkpoint = start + opts.checkpoint_every_s
    net.train()

    def checkpoint() -> None:
        save_atomically(
            {
                "format": CHECKPOINT_FORMAT,
                "factor": factor,
                "preset": opts.preset,
                "slice_profile": opts.slice_profile,
                "reparam": opts.reparam,
                "intensity": intensity,
                "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "best_model": best_weights,
                "state": state,
                "random": random_state(generator, device),
            },
            ckpt,
        )

    while True:
        now = time.perf_counter()
        done = (
            state["step"] >= total
            or (opts.stop_after is not None and lease["steps"] >= opts.stop_after)
            or (opts.lease_minutes is not None and now - start >= opts.lease_minutes * 60)
        )
        state["seconds"] = seconds_before + now - start
        state["cpu_seconds"] = cpu_before + time.process_time() - process_start
        lease["train_seconds"] = round(now - start, 2)
        if state["step"] % state["validate_every"] == 0 or state["step"] >= total:
            if not state["curve"] or state["curve"][-1]["iteration"] != state["step"]:
                point = {"iteration": state["step"], "seconds": round(state["seconds"], 1)}
                point |= validate(net, items, validation, factor) | {"lease": lease["lease"]}
                state["curve"].append(point)
                improved = point["psnr"] > state["best"]
                if improved:
                    state["best"] = point["psnr"]
                    best_weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
                if improved or opts.keep == "last":
                    save_weights(net, opts.reparam, out / f"prior_x{factor}.pt")
                write_card(context, state)
                bar.validation(point)
        if done or time.perf_counter() >= next_checkpoint:
            checkpoint()
            next_checkpoint = time.perf_counter() + opts.checkpoint_every_s
        if done:
            break
        for group in optimizer.param_groups:
            group["lr"] = cosine_rate(state["lr"], state["lr_min"], state["step"], total)
        loss = one_step(net, iteration, bank, opts, log_scales, generator, optimizer, use_bf16, device)
        state["step"] += 1
        lease["steps"] += 1
        bar.step(loss)
    bar.close()
    lease["iterations_per_s"] = round(lease["steps"] / max(lease["train_seconds"], 1e-9), 3)
    lease["samples_per_s"] = round(lease["iterations_per_s"] * opts.planes, 1)
    card = write_card(context, state)
    checkpoint()
    best = card["validation"]["best"]
    logger.info(
        "x%d: lease %d trained %d steps in %.0f s (%.2f it/s); best validation PSNR %.3f dB vs linear %.3f (%+.3f) "
        "at step %d of %d; %s",
        factor,
        lease["lease"],
        lease["steps"],
        lease["train_seconds"],
        lease["iterations_per_s"],
        best["psnr"],
        best["linear"],
        best["psnr"] - best["linear"],
        best["iteration"],
        total,
        card["validation"]["assessment"],
    )
    return card


class progress_bar:
    """A run-level bar over the schedule's steps with ETA and the last validation PSNR (tqdm, on a
    terminal), or a plain line per validation where the output is not one (a scheduler's log)."""

    def __init__(self, enabled: bool | None, total: int, initial: int, name: str):
        from tqdm.auto import tqdm

        self.name, self.total = name, total
        tty = sys.stderr.isatty() if enabled is None else enabled
        self.bar = tqdm(total=total, initial=initial, desc=f"pretrain {name}", unit="step", disable=not tty)
        self.plain = not tty

    def step(self, loss: torch.Tensor) -> None:
        self.bar.update(1)

    def validation(self, point: dict) -> None:
        text = f"val {point['psnr']:.2f} dB (linear {point['linear']:.2f})"
        if "held_out_psnr" in point:
            text += f", left out {point['held_out_psnr']:.2f} (linear {point['held_out_linear']:.2f})"
        if self.plain:
            print(
                f"pretrain {self.name}: step {point['iteration']}/{self.total} {point['seconds']:.0f}s {text}",
                flush=True,
            )
        else:
            self.bar.set_postfix_str(text)

    def close(self) -> None:
        self.bar.close()


def machine_kind() -> str:
    from .timing import machine_description

    return machine_description()


def default_bf16(device: torch.device) -> tuple[bool, str]:
    """bf16 autocast on CUDA; on a CPU where the planner's conv probe finds it faster than float32."""
    if device.type == "cuda":
        return True, "CUDA: bf16 autocast"
    precision, reason = decide_inference_precision(cuda=False)
    return precision == "bf16", f"the planner's CPU probe: {reason}"


def continued_card(folder: Path, factor: int) -> dict:
    """The history of the prior a run continues (``--init_from``): its card without the long curve,
    the data by name, and no path of the machine it was made on."""
    path = folder / f"prior_x{factor}.json"
    if not path.is_file() or not path.with_suffix(".pt").is_file():
        raise ICMDError(f"--init_from {folder}: no prior_x{factor}.pt with its card prior_x{factor}.json")
    card = json.loads(path.read_text())
    keep = ("factor", "preset", "intensity", "iterations", "seconds", "device", "command", "licences")
    summary = {k: strip_paths(card[k]) for k in keep if k in card}
    summary["cpu_hours"] = round(card_cpu_hours(card), 5)
    summary["data"] = sorted(card.get("data", {}))
    summary["validation"] = {"best": card["validation"]["best"]}
    summary["leases"] = [
        {
            k: strip_paths(v)
            for k, v in lease.items()
            if k
            in (
                "lease",
                "device",
                "started",
                "command",
                "steps",
                "train_seconds",
                "threads",
                "iterations_per_s",
            )
        }
        for lease in card.get("leases", [])
    ]
    summary["continued_from"] = card.get("continued_from") and strip_paths(card["continued_from"])
    return summary


def strip_paths(value):
    """``value`` with every absolute path in its strings cut to its last component."""
    if isinstance(value, str):
        return re.sub(r"(?<![\w.])/(?:[^\s'\"/]+/)+([^\s'\"/]+)", r"\1", value)
    if isinstance(value, dict):
        return {k: strip_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strip_paths(v) for v in value]
    return value


def cpu_hours(state: dict) -> float:
    """CPU-hours of this run's training (process CPU time: one core busy for an hour is one) and of
    the priors it continued."""
    return round(state["cpu_seconds"] / 3600 + card_cpu_hours(state.get("continued_from")), 5)


def card_cpu_hours(card: dict | None) -> float:
    """A card's CPU-hours, its own and its ancestors'; for a card of the earlier benchmarks script
    (no ``cpu_hours``), its CPU leases' training seconds times their threads."""
    if not card:
        return 0.0
    if "cpu_hours" in card:
        return float(card["cpu_hours"])
    own = sum(
        lease.get("train_seconds", 0.0) * lease.get("threads", 1) / 3600
        for lease in card.get("leases", [])
        if lease.get("device") == "cpu"
    )
    return own + card_cpu_hours(card.get("continued_from"))


def last_third_gain(curve: list[dict], key: str) -> float | None:
    """How much the best of the curve's last third beats the best before it (dB), over the points
    that hold ``key``; None with fewer than 6."""
    points = [p[key] for p in curve if key in p]
    if len(points) < 6:
        return None
    cut = len(points) * 2 // 3
    return max(points[cut:]) - max(points[:cut])


def assess(curve: list[dict]) -> str:
    """What the validation curves say: still rising (more hours help) or flat, and then which lever
    is next. Judged on the left-out volumes' real z-axes where the run has them ("held_out_psnr":
    scans it never trained on, as a user's); the in-plane score of the training volumes' held-out
    slabs ("psnr") tells the two flat cases apart: still rising there, the network keeps learning
    its data and that no longer carries to new scans (more, more varied data is next); flat there
    too, it holds what it can (a larger network is next)."""
    held_out = last_third_gain(curve, "held_out_psnr")
    scored = [p for p in curve if "held_out_psnr" in p]  # both curves over the same points
    inplane = last_third_gain(scored if held_out is not None else curve, "psnr")
    if held_out is None:
        if inplane is None:
            return "too short to judge"
        if inplane >= FLAT_GAIN_DB:
            return (
                f"still rising: the last third of the curve gained {inplane:+.3f} dB; more hours should help"
            )
        return (
            f"flat by the in-plane validation: the last third of the curve gained {inplane:+.3f} dB over the best "
            "before it; that validation is a proxy (twice it stayed flat while held-out z-axes gained 0.14 to 0.26 "
            "dB, docs/RESULTS.md): judge by leave-one-out (--leave_out scores it) before turning to more data or a "
            "larger network"
        )
    said = f"on the left-out volumes' real z-axes the last third of the curve gained {held_out:+.3f} dB"
    if held_out >= FLAT_GAIN_DB:
        return f"still rising: {said}; more hours should help"
    if inplane >= FLAT_GAIN_DB:
        return (
            f"flat for new scans: {said}, while the training volumes' held-out slices gained {inplane:+.3f}: "
            "more (and more varied) data is the next lever, not more hours"
        )
    return (
        f"flat: {said}, and the training volumes' held-out slices {inplane:+.3f}: the network holds what it "
        "can; a larger network is the next lever, not more hours"
    )


def write_card(context: dict, state: dict) -> dict:
    """``prior_x{r}.json``: the card of the best weights so far (``prior_x{r}.pt``), rewritten at every
    validation, so that a run stopped at any time leaves its best prior and its history."""
    opts, preset, bank = context["opts"], context["preset"], context["bank"]
    volumes: dict[str, Volume] = context["volumes"]
    best = max(state["curve"], key=lambda c: c["psnr"])
    licences = sorted({v.record.get("licence", "not stated") for v in volumes.values()})
    card = {
        "factor": opts.factor,
        "recipe": RECIPE,
        "method": RECIPES[RECIPE],
        "preset": opts.preset,
        "architecture": {"axial": preset.axial, "planar": preset.planar},
        "reparam": (
            "trained with re-parameterised 3x3 convolutions (3x3, 1x1, 1x1-expansion-3x3, Sobel/Laplacian edge "
            "and identity branches summed into one kernel; bundle/scripts/networks/reparam.py), shipped folded: "
            "the architecture above, at its speed"
            if opts.reparam
            else False
        ),
        "intensity": context["intensity"],
        "slice_profile": opts.slice_profile,
        "scale_range": list(opts.scale_range),
        "thin_supervision": {
            "what": f"coronal/sagittal planes of volumes with z-spacing <= {THIN_MAX_MM} mm degraded by r along z",
            "volumes": bank.thin_volumes,
            "crop": bank.zsize,
        },
        "data": {
            name: {
                "shape": list(v.array.shape),
                "spacing_mm": [round(s, 4) for s in v.spacing],
                "source": v.source,
                "licence": v.record.get("licence", "not stated"),
                **{k: val for k, val in v.record.items() if k != "licence"},
            }
            for name, v in volumes.items()
        },
        "licences": licences,
        "left_out": list(opts.leave_out),
        "iterations": state["step"],
        "seconds": round(state["seconds"], 1),
        "cpu_hours": cpu_hours(state),
        "device": ", ".join(dict.fromkeys(lease["device"] for lease in state["leases"])),
        "schedule": {
            "what": "Adam; cosine learning rate from lr to lr_min over total_steps, summed over the leases",
            "total_steps": state["total_steps"],
            "lr": state["lr"],
            "lr_min": state["lr_min"],
        },
        "leases": state["leases"],
        "validation": {
            "what": "a central slab of every volume's slices held out of all training crops; in-plane pairs of "
            f"{VALIDATION_SLICES} of its slices per volume ({VALIDATION_CROP}-pixel centre crop, both views) and, on "
            "the thin volumes, its coronal/sagittal planes degraded along z (z_psnr); on each --leave_out volume "
            f"(held_out_psnr), {LEFT_OUT_PLANES} coronal and {LEFT_OUT_PLANES} sagittal planes through its centre "
            f"crop (at most {LEFT_OUT_CROP} pixels) made thick along the real z-axis by slice removal; PSNR on the "
            "evaluation protocol's HU scale, synthesized positions, mean over volumes; each *_linear is linear "
            "interpolation's",
            "best": best,
            "kept": (
                {"weights": "last", "iteration": state["step"]}
                if opts.keep == "last"
                else {"weights": "best", "iteration": best["iteration"]}
            ),
            "assessment": assess(state["curve"]),
            "curve": state["curve"],
        },
        "command": opts.command,
        "continued_from": state.get("continued_from"),
    }
    save_atomically(json.dumps(card, indent=1) + "\n", Path(opts.out) / f"prior_x{opts.factor}.json")
    return card
