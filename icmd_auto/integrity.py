"""Dataset integrity check, before any work (nnU-Net's verify_dataset_integrity).

Every image of dataset.json is opened once: it must exist, be readable as a NIfTI file or a
DICOM series, be 3-D with one channel, and hold finite values. All problems are collected and
reported together, each with its file name. Intensities outside a plausible CT (HU) range are
a warning, not an error: the method works on any intensities, but the planner's window and the
reports assume HU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .dataset import DatasetSpec
from .errors import DatasetIntegrityError
from .fingerprint import CaseFingerprint, CaseReadError, case_fingerprint, load_case_array, sample_voxels

# HU of air is -1000; real CT holds air (inside or around the body) and rarely exceeds a few
# thousand HU (dense metal). Intensities in [0, 1] or without any air are probably not HU.
HU_AIR_MAX_P05 = -500.0
HU_PLAUSIBLE_MIN = -3100.0
HU_PLAUSIBLE_MAX = 40_000.0


@dataclass
class IntegrityReport:
    cases: list[CaseFingerprint] = field(default_factory=list)
    samples: list[np.ndarray] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_case(path: str, array: np.ndarray) -> list[str]:
    """The problems of one loaded case (empty when it is fine)."""
    if array.ndim == 2:
        return [f"{path}: 2-D image (shape {list(array.shape)}); a 3-D CT volume is needed"]
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        return [f"{path}: {array.ndim}-D image (shape {list(array.shape)}); one 3-D channel is needed"]
    if min(array.shape) < 2:
        return [f"{path}: degenerate volume (shape {list(array.shape)})"]
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


def verify_dataset_integrity(spec: DatasetSpec, include_test: bool = False) -> IntegrityReport:
    """Open every training image (and the test images if asked); raise with all problems at once.

    Returns:
        the per-case fingerprints, pooled voxel samples and warnings of the readable cases.

    Raises:
        DatasetIntegrityError: one line per problem, each naming its file.
    """
    report, problems = IntegrityReport(), []
    paths = list(spec.training) + (list(spec.test) if include_test else [])
    for i, path in enumerate(paths):
        try:
            array, affine, dtype = load_case_array(path)
        except CaseReadError as e:
            problems.append(str(e))
            continue
        case_problems = check_case(str(path), array)
        if case_problems:
            problems.extend(case_problems)
            continue
        if array.ndim == 4:
            array = array[..., 0]
        case = case_fingerprint(path, array, affine, dtype)
        warning = ct_range_warning(case)
        if warning:
            report.warnings.append(warning)
        if i < len(spec.training):
            report.cases.append(case)
            report.samples.append(sample_voxels(array, seed=i))
    if problems:
        raise DatasetIntegrityError(str(spec.path), problems)
    return report
