"""Input integrity checks, before any work (nnU-Net's verify_dataset_integrity).

Every image a command will use (plan: dataset.json's; train: the bundle's datalist; evaluate: the
test images; predict: each input) is opened once first: it must exist, be readable as a NIfTI
file or one regular DICOM series (dicom_checks.py; from a folder holding several series, the one
named with ``--series`` or the only axial CT series, named in the log), be 3-D with one channel,
have the slices the command needs, and hold finite values. All problems are collected and
reported together, each with its file name. Intensities outside a plausible CT (HU) range are
a warning, not an error: the method works on any intensities, but the planner's window and the
reports assume HU.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .dataset import DatasetSpec
from .errors import DatasetIntegrityError
from .fingerprint import (
    CaseFingerprint,
    CaseReadError,
    LoadedCase,
    case_fingerprint,
    load_case,
    sample_voxels,
)
from .template import scripts

logger = logging.getLogger("icmd_auto")

# HU of air is -1000; real CT holds air (inside or around the body) and rarely exceeds a few
# thousand HU (dense metal). Intensities in [0, 1] or without any air are probably not HU.
HU_AIR_MAX_P05 = -500.0
HU_PLAUSIBLE_MIN = -3100.0
HU_PLAUSIBLE_MAX = 40_000.0
# slices are synthesised between two known ones
MIN_SLICES = 2


@dataclass
class IntegrityReport:
    cases: list[CaseFingerprint] = field(default_factory=list)
    samples: list[np.ndarray] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_case(
    path: str, array: np.ndarray, min_slices: int = MIN_SLICES, purpose: str = "slice synthesis"
) -> list[str]:
    """The problems of one loaded case (empty when it is fine).

    ``min_slices`` is what ``purpose`` needs along z (2 to synthesise between slices; r+1 to
    train or to simulate a thick input at factor r).
    """
    if array.ndim == 2:
        return [f"{path}: 2-D image (shape {list(array.shape)}); a 3-D CT volume is needed"]
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        return [f"{path}: {array.ndim}-D image (shape {list(array.shape)}); one 3-D channel is needed"]
    if min(array.shape[:2]) < 2:
        return [f"{path}: degenerate volume (shape {list(array.shape)})"]
    if array.shape[2] < min_slices:
        return [f"{path}: {array.shape[2]} slice(s); {purpose} needs at least {min_slices}"]
    bad = int(array.size - np.isfinite(array).sum()) if array.dtype.kind == "f" else 0
    if bad:
        return [f"{path}: {bad} voxels are NaN or Inf"]
    return []


def ct_range_warning(case: CaseFingerprint) -> str | None:
    it = case.intensity
    if not it:
        return None
    if it["min"] < HU_PLAUSIBLE_MIN or it["max"] > HU_PLAUSIBLE_MAX:
        return f"{case.image}: intensities {it['min']:.0f}..{it['max']:.0f} exceed the usual CT range in HU"
    if it["p0.5"] > HU_AIR_MAX_P05:
        return (
            f"{case.image}: no air found (0.5th percentile {it['p0.5']:.1f}); "
            "the intensities may not be CT Hounsfield units"
        )
    return None


def check_volume(
    path: str | Path,
    min_slices: int = MIN_SLICES,
    purpose: str = "slice synthesis",
    series: Sequence[str] = (),
    strict: bool = False,
) -> tuple[CaseFingerprint, LoadedCase]:
    """Open one image and check it; returns its fingerprint and the case as read (``check_image``)."""
    case = load_case(path, series, strict)
    problems = check_case(str(path), case.array, min_slices, purpose)
    if problems:
        raise CaseReadError(problems[0])
    if case.array.ndim == 4:
        case.array = case.array[..., 0]
    fingerprint = case_fingerprint(path, case.array, case.affine, case.dtype)
    if case.series is not None and (case.series.notable or case.series.named):
        fingerprint.series = case.series.series.uid or None
        if case.series.notable:
            logger.info(case.series.describe())
    return fingerprint, case


def check_image(
    path: str | Path,
    min_slices: int = MIN_SLICES,
    purpose: str = "slice synthesis",
    series: Sequence[str] = (),
    strict: bool = False,
) -> tuple[CaseFingerprint, np.ndarray, np.ndarray]:
    """Open one image and check it; returns its fingerprint, its (X, Y, Z) array and its affine.

    ``series``: SeriesInstanceUIDs to take from a DICOM folder holding several series (``strict``:
    the folder must hold one of them). A series taken from a folder that holds more is named in
    the log, with what was left aside, and in the fingerprint (as is a series named for its folder).

    Raises:
        CaseReadError: one line naming the file and the problem.
    """
    fingerprint, case = check_volume(path, min_slices, purpose, series, strict)
    return fingerprint, case.array, case.affine


def verify_images(
    paths: list,
    source: str,
    min_slices: int = MIN_SLICES,
    purpose: str = "slice synthesis",
    pooled: int = 0,
    series: Sequence[str] = (),
    entry_series: Mapping[str, str] | None = None,
) -> IntegrityReport:
    """Open every image in ``paths``; raise with all problems at once, naming ``source`` (where the
    list comes from) when there are several.

    ``series``: SeriesInstanceUIDs (``--series``) to take wherever a DICOM folder holds one of
    them; each must be taken from some folder. ``entry_series``: the one series to take from a
    given path (its dataset.json entry's "series"), which that folder must hold.

    Returns:
        the fingerprints of all images, voxel samples of the first ``pooled`` ones (for the
        dataset's intensity statistics), and the non-CT-range warnings.

    Raises:
        DatasetIntegrityError: one line per problem, each naming its file.
    """
    report, problems = IntegrityReport(), []
    entry_series = dict(entry_series or {})
    series = scripts.dicom_series.series_uids(series)
    for i, path in enumerate(paths):
        named = entry_series.get(str(path))
        try:
            case, array, _ = check_image(
                path, min_slices, purpose, series=(named,) if named else series, strict=bool(named)
            )
        except CaseReadError as e:
            problems.append(str(e))
            continue
        warning = ct_range_warning(case)
        if warning:
            report.warnings.append(warning)
        report.cases.append(case)
        if i < pooled:
            report.samples.append(sample_voxels(array, seed=i))
    taken = {case.series for case in report.cases}
    if not problems:  # a folder refused for another reason may hold the series
        problems = [
            f"{source}: no DICOM folder holds the series named {uid}" for uid in series if uid not in taken
        ]
    if problems:
        raise DatasetIntegrityError(source, problems)
    return report


def verify_dataset_integrity(
    spec: DatasetSpec, include_test: bool = False, series: Sequence[str] = ()
) -> IntegrityReport:
    """Open every training image (and the test images if asked); raise with all problems at once.

    ``series``: SeriesInstanceUIDs (``--series``) to take where a DICOM folder holds several
    series; an entry's own "series" is taken from its folder.

    Returns:
        the per-case fingerprints, pooled voxel samples and warnings of the training images (and
        the test images' warnings).

    Raises:
        DatasetIntegrityError: one line per problem, each naming its file.
    """
    training = list(spec.training)
    paths = training + (list(spec.test) if include_test else [])
    report = verify_images(
        paths, str(spec.path), pooled=len(training), series=series, entry_series=spec.entry_series
    )
    report.cases = report.cases[: len(training)]
    return report
