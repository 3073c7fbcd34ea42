"""Dataset fingerprint: facts about the data, no decisions (nnU-Net's dataset_fingerprint).

Per case: shape, spacing (mm), orientation code, stored dtype, intensity percentiles
0.5 / 50 / 99.5 (HU). Dataset: median spacing and shape, and pooled intensity statistics
(percentiles, and mean / std after clipping to the 0.5-99.5 window, as nnU-Net's
CTNormalization uses them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import NibabelReader
from monai.transforms import LoadImage

from .dicom_checks import check_series
from .errors import ICMDError
from .template import scripts

PERCENTILES = (0.5, 50.0, 99.5)
# voxels pooled per case for the dataset-level intensity statistics (nnU-Net samples 10k
# foreground voxels per case; we have no foreground mask, so we take more, uniformly)
POOL_PER_CASE = 200_000
# above this many voxels a case's own percentiles are computed on a regular subsample
MAX_VOXELS_FOR_PERCENTILES = 20_000_000


class CaseReadError(ICMDError):
    """A case could not be read as a volume."""


@dataclass
class CaseFingerprint:
    image: str
    shape: list[int]
    spacing: list[float]
    orientation: str
    dtype: str
    intensity: dict[str, float]
    all_finite: bool
    # the SeriesInstanceUID taken from a DICOM folder that holds more than it, or named for one
    series: str | None = None


@dataclass
class LoadedCase:
    """One image as read: the array (no channel axis), its affine, its stored dtype, for a DICOM
    folder the series taken from it, and the volume as MONAI read it (a MetaTensor sharing the
    array's memory, with its meta: what the bundle's loader takes instead of reading again)."""

    array: np.ndarray
    affine: np.ndarray
    dtype: str
    series: scripts.dicom_series.SeriesChoice | None = None
    image: Any = None


def load_case(path: str | Path, series: Sequence[str] = (), strict: bool = False) -> LoadedCase:
    """Read a NIfTI file or DICOM folder.

    A DICOM folder gives the series ``scripts.dicom_series`` chooses (``series``: the
    SeriesInstanceUIDs to take where it holds several; ``strict``: it must hold one of them), which
    must be one regular series (dicom_checks.py), checked from its headers before MONAI decodes and
    stacks the slices.

    Raises:
        CaseReadError: missing, unreadable, not an image, no series to take, or an inconsistent
            DICOM series.
    """
    path = Path(path)
    if not path.exists():
        raise CaseReadError(f"{path}: file not found")
    if path.is_file() and not scripts.io.is_nifti(path):
        raise CaseReadError(f"{path}: not a NIfTI file (.nii / .nii.gz) or DICOM series folder")
    try:  # the readers report a refused read as an unreadable file; the user needs to see why
        os.close(os.open(path, os.O_RDONLY))
    except PermissionError as e:
        raise CaseReadError(f"{path}: {e.strerror}: this user may not read it") from None
    choice = None
    if path.is_dir():
        choice, problems = check_series(path, series, strict)
        if problems:
            raise CaseReadError("; ".join(problems))
        # the reader chooses again from the same headers; the chosen UID makes that explicit
        reader = scripts.dicom_series.DicomSeriesReader(
            series=[choice.series.uid] if choice.series.uid else None, log_choice=False
        )
        kind = "DICOM series"
    else:
        kind, reader = "NIfTI", NibabelReader()
    # one reader, named: LoadImage would otherwise try the others and report the last one's failure
    try:
        img = LoadImage(image_only=True, dtype=None)(str(path), reader=reader)
        array = np.asarray(img)
    except Exception as e:  # readers raise many types (zlib, EOF, pydicom); the user needs file and reason
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CaseReadError(f"{path}: cannot be read as a {kind} ({reason[:200]})") from None
    dtype = str(scripts.io.stored_dtype(path)) if scripts.io.is_nifti(path) else "int16"
    return LoadedCase(array, np.asarray(img.affine, dtype=np.float64), dtype, choice, img)


def load_case_array(
    path: str | Path, series: Sequence[str] = (), strict: bool = False
) -> tuple[np.ndarray, np.ndarray, str]:
    """``load_case`` as (array without channel axis, affine, dtype)."""
    case = load_case(path, series, strict)
    return case.array, case.affine, case.dtype


def percentiles(values: np.ndarray) -> dict[str, float]:
    flat = values.reshape(-1)
    if flat.size > MAX_VOXELS_FOR_PERCENTILES:
        flat = flat[:: int(np.ceil(flat.size / MAX_VOXELS_FOR_PERCENTILES))]
    p = np.percentile(flat, PERCENTILES)
    return {f"p{q:g}": float(v) for q, v in zip(PERCENTILES, p)} | {
        "min": float(flat.min()),
        "max": float(flat.max()),
    }


def case_fingerprint(path: str | Path, array: np.ndarray, affine: np.ndarray, dtype: str) -> CaseFingerprint:
    finite = bool(np.isfinite(array).all())
    values = array if finite else array[np.isfinite(array)]
    return CaseFingerprint(
        image=str(path),
        shape=[int(s) for s in array.shape],
        spacing=[round(s, 6) for s in scripts.io.voxel_spacing(affine)],
        orientation="".join(nib.aff2axcodes(affine)),
        dtype=dtype,
        intensity=percentiles(values) if values.size else {},
        all_finite=finite,
    )


def pooled_intensity(samples: list[np.ndarray]) -> dict[str, float]:
    """Dataset intensity statistics from voxels pooled over all cases."""
    pool = np.concatenate([s.astype(np.float64) for s in samples])
    stats = percentiles(pool)
    clipped = np.clip(pool, stats["p0.5"], stats["p99.5"])
    stats["mean"] = float(clipped.mean())
    stats["std"] = float(max(clipped.std(), 1e-6))
    return stats


def intensity_standardisation(stats: dict) -> dict:
    """The networks' intensity standardisation from pooled statistics (``pooled_intensity``):
    nnU-Net's CTNormalization, the clip window at the 0.5 / 99.5 percentiles (``clip_low``,
    ``clip_high``, HU) and the mean and std of the clipped voxels; ``clip_image`` false (the image
    keeps its HU beyond the window, only the networks' feature branches are clamped). As the
    configs' ``intensity`` section, plans.json and a prior's card hold it."""
    return {
        "clip_low": stats["p0.5"],
        "clip_high": stats["p99.5"],
        "mean": stats["mean"],
        "std": stats["std"],
        "clip_image": False,
    }


def intensity_window(intensity: dict) -> tuple[float, float]:
    """The clip window (``clip_low``, ``clip_high`` HU) in standardised units, (HU - mean) / std: what
    the networks' feature branches clamp their input to."""
    return (
        (intensity["clip_low"] - intensity["mean"]) / intensity["std"],
        (intensity["clip_high"] - intensity["mean"]) / intensity["std"],
    )


def sample_voxels(array: np.ndarray, n: int = POOL_PER_CASE, seed: int = 0) -> np.ndarray:
    flat = array.reshape(-1)
    flat = flat[np.isfinite(flat)]
    if flat.size <= n:
        return flat.copy()
    return np.random.default_rng(seed).choice(flat, size=n, replace=False)


def dataset_fingerprint(cases: list[CaseFingerprint], samples: list[np.ndarray], name: str) -> dict:
    """Aggregate per-case facts into the dataset fingerprint (the content of fingerprint.json)."""
    spacings = np.array([c.spacing for c in cases])
    shapes = np.array([c.shape for c in cases])
    return {
        "dataset": name,
        "num_cases": len(cases),
        "median_spacing": [float(v) for v in np.median(spacings, axis=0)],
        "median_shape": [float(v) for v in np.median(shapes, axis=0)],
        "min_slices": int(shapes[:, 2].min()),
        "intensity": pooled_intensity(samples),
        "cases": [asdict(c) for c in cases],
    }


def write_fingerprint(fingerprint: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(fingerprint, indent=2) + "\n")
    return path
