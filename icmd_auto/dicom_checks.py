"""Is a DICOM folder one regular series? Checked from the headers alone, before any pixel is decoded.

A folder may be a study export: several series (in it or in one subfolder each) and non-image
DICOM objects. The bundle's ``scripts.dicom_series`` chooses the series that is the volume (the
one named with ``--series``, the only image series, or the only axial CT series) and reads only
that one; the checks here refuse a folder where it cannot choose, with the reason and the series
listed, and then check the chosen series.

MONAI's PydicomReader stacks the slices in InstanceNumber order and takes the slice spacing from
the first and last positions. It warns, and goes on, when the files differ in size or spacing, so
a series with a slice missing, or one with uneven slice spacing, gives a volume with wrong
geometry and no error. These checks refuse such a series with the reason instead, reading headers
only (``stop_before_pixels``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom

from .template import scripts

# how a user names one series where a folder holds several
SERIES_HINT = 'name one with --series UID (or "series" in its dataset.json entry)'
# geometry tags every slice needs for MONAI to place it
GEOMETRY_TAGS = ("InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
ORIENTATION_TOLERANCE = 1e-3  # direction cosines
SPACING_TOLERANCE_MM = 1e-3  # in-plane pixel spacing
# slice steps: DS strings carry a few decimals, so allow 1% of the step (at least 0.01 mm)
STEP_RELATIVE_TOLERANCE = 0.01
STEP_MIN_TOLERANCE_MM = 0.01


def _differing(headers, tag: str, tolerance: float) -> tuple[list[float], list[float], str] | None:
    """The first value of ``tag`` that differs from the first slice's, with its file name."""
    first = [float(v) for v in headers[0][1].get(tag)]
    for name, ds in headers[1:]:
        value = [float(v) for v in ds.get(tag)]
        if not np.allclose(value, first, atol=tolerance):
            return first, value, name
    return None


def check_series(
    folder: str | Path, series: Sequence[str] = (), strict: bool = False
) -> tuple[scripts.dicom_series.SeriesChoice | None, list[str]]:
    """The series of ``folder`` that is the volume, and what makes it not one regular DICOM series.

    The choice is ``scripts.dicom_series.choose_series`` (``series``: SeriesInstanceUIDs to take;
    ``strict``: the folder must hold one of them); the problems are empty when the chosen series
    is regular. Checked: every header readable; every slice carrying the geometry tags; one size,
    orientation and pixel spacing; distinct InstanceNumbers; slice positions (along the slice
    normal, in InstanceNumber order) monotonic and evenly spaced, which catches a missing slice,
    duplicates and varying spacing. Each message starts with ``folder``.
    """
    folder = Path(folder)
    scan = scripts.dicom_series.scan_folder(folder)
    if scan.unreadable:
        return None, [
            f"{folder}: {path.relative_to(folder)}: unreadable DICOM header ({reason})"
            for path, reason in scan.unreadable
        ]
    try:
        choice = scripts.dicom_series.choose_series(folder, series, strict, hint=SERIES_HINT, scan=scan)
    except scripts.dicom_series.SeriesChoiceError as e:
        return None, [str(e)]
    chosen = choice.series
    headers = [(str(path.relative_to(folder)), ds) for path, ds in zip(chosen.files, chosen.headers)]
    return choice, _regularity_problems(folder, headers)


def _regularity_problems(folder: Path, headers: list[tuple[str, pydicom.Dataset]]) -> list[str]:
    for tag in GEOMETRY_TAGS:
        lacking = [name for name, ds in headers if ds.get(tag) in (None, "")]
        if lacking:
            return [
                f"{folder}: {len(lacking)} file(s) have no {tag} (e.g. {lacking[0]}); slices cannot be placed"
            ]

    sizes = Counter((int(ds.Rows), int(ds.Columns)) for _, ds in headers)
    if len(sizes) > 1:
        (a, _), (b, _) = sizes.most_common(2)
        return [
            f"{folder}: mixed series: slices of {a[0]}x{a[1]} and {b[0]}x{b[1]} pixels in one folder; "
            "put each series in its own folder"
        ]
    for tag, what, tolerance in (
        ("ImageOrientationPatient", "orientations", ORIENTATION_TOLERANCE),
        ("PixelSpacing", "pixel spacings", SPACING_TOLERANCE_MM),
    ):
        differ = _differing(headers, tag, tolerance)
        if differ:
            first, value, name = differ
            return [
                f"{folder}: mixed series: {what} differ ({tag} {[round(v, 4) for v in first]} and "
                f"{[round(v, 4) for v in value]} in {name}); put each series in its own folder"
            ]

    instances = Counter(int(ds.InstanceNumber) for _, ds in headers)
    repeated = [n for n, count in instances.items() if count > 1]
    if repeated:
        return [
            f"{folder}: InstanceNumber {repeated[0]} is used by {instances[repeated[0]]} files; "
            "the slice order is ambiguous (two series in one folder?)"
        ]
    return _spacing_problems(folder, sorted(headers, key=lambda h: int(h[1].InstanceNumber)))


def _spacing_problems(folder: Path, headers: list[tuple[str, pydicom.Dataset]]) -> list[str]:
    if len(headers) < 2:
        return []
    orientation = np.array([float(v) for v in headers[0][1].ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([np.dot(normal, [float(v) for v in ds.ImagePositionPatient]) for _, ds in headers])
    steps = np.diff(positions)
    numbers = [int(ds.InstanceNumber) for _, ds in headers]

    def between(i: int) -> str:
        return f"instances {numbers[i]} and {numbers[i + 1]}"

    same = np.flatnonzero(np.abs(steps) < STEP_MIN_TOLERANCE_MM)
    if same.size:
        return [
            f"{folder}: two slices at the same position ({between(same[0])}); duplicate slices or two series"
        ]
    if not (np.all(steps > 0) or np.all(steps < 0)):
        turn = int(np.flatnonzero(np.sign(steps) != np.sign(steps[0]))[0])
        return [
            f"{folder}: slice positions do not follow the InstanceNumber order (the direction turns between "
            f"{between(turn)})"
        ]
    sizes = np.abs(steps)
    step = float(np.median(sizes))
    tolerance = max(STEP_MIN_TOLERANCE_MM, STEP_RELATIVE_TOLERANCE * step)
    irregular = np.flatnonzero(np.abs(sizes - step) > tolerance)
    if not irregular.size:
        return []
    i = int(irregular[0])
    gap = float(sizes[i])
    multiple = round(gap / step)
    more = f" ({irregular.size} irregular steps in all)" if irregular.size > 1 else ""
    if multiple >= 2 and abs(gap - multiple * step) <= tolerance * multiple:
        return [
            f"{folder}: missing slice(s): {gap:.4g} mm between {between(i)}, {multiple} times the series' "
            f"{step:.4g} mm step{more}"
        ]
    return [
        f"{folder}: varying slice spacing: {gap:.4g} mm between {between(i)}, {step:.4g} mm elsewhere{more}; "
        "resample to a regular spacing first"
    ]
