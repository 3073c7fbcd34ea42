"""Is a DICOM folder one regular series? Checked from the headers alone, before any pixel is decoded.

MONAI's PydicomReader stacks every DICOM file of a folder in InstanceNumber order and takes the
slice spacing from the first and last positions. It warns, and goes on, when the files differ in
size or spacing, so a folder holding two series, a series with a slice missing, or one with
uneven slice spacing gives a volume with wrong geometry and no error. These checks refuse such a
folder with the reason instead, reading headers only (``stop_before_pixels``).

An empty SeriesInstanceUID (as anonymised data has) counts as unknown, not as a second series.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
from pydicom.misc import is_dicom

# geometry tags every slice needs for MONAI to place it
GEOMETRY_TAGS = ("InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
ORIENTATION_TOLERANCE = 1e-3  # direction cosines
SPACING_TOLERANCE_MM = 1e-3  # in-plane pixel spacing
# slice steps: DS strings carry a few decimals, so allow 1% of the step (at least 0.01 mm)
STEP_RELATIVE_TOLERANCE = 0.01
STEP_MIN_TOLERANCE_MM = 0.01


def _headers(folder: Path) -> tuple[list[tuple[str, pydicom.Dataset]], list[str]]:
    headers, problems = [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if not is_dicom(str(path)):  # MONAI reads the files with the DICM marker, so do we
            continue
        try:
            headers.append((path.name, pydicom.dcmread(path, stop_before_pixels=True)))
        except Exception as e:  # noqa: BLE001  pydicom raises several types for broken headers
            problems.append(f"{path.name}: unreadable DICOM header ({type(e).__name__}: {e})")
    return headers, problems


def _differing(headers, tag: str, tolerance: float) -> tuple[list[float], list[float], str] | None:
    """The first value of ``tag`` that differs from the first slice's, with its file name."""
    first = [float(v) for v in headers[0][1].get(tag)]
    for name, ds in headers[1:]:
        value = [float(v) for v in ds.get(tag)]
        if not np.allclose(value, first, atol=tolerance):
            return first, value, name
    return None


def series_problems(folder: str | Path) -> list[str]:
    """What makes ``folder`` not one regular DICOM series (empty when it is one).

    Checked: every header readable and carrying the geometry tags; one SeriesInstanceUID; one
    size, orientation and pixel spacing; distinct InstanceNumbers; slice positions (along the
    slice normal, in InstanceNumber order) monotonic and evenly spaced, which catches a missing
    slice, duplicates and varying spacing. Each message starts with ``folder``.
    """
    folder = Path(folder)
    headers, unreadable = _headers(folder)
    if unreadable:
        return [f"{folder}: {p}" for p in unreadable]
    if not headers:
        return [f"{folder}: no DICOM files (none has the 'DICM' marker)"]
    for tag in GEOMETRY_TAGS + ("Rows", "Columns"):
        lacking = [name for name, ds in headers if ds.get(tag) in (None, "")]
        if lacking:
            return [
                f"{folder}: {len(lacking)} file(s) have no {tag} (e.g. {lacking[0]}); slices cannot be placed"
            ]

    uids = Counter(str(ds.get("SeriesInstanceUID", "") or "") for _, ds in headers)
    uids.pop("", None)
    if len(uids) > 1:
        counts = ", ".join(f"{uid} ({n} files)" for uid, n in uids.most_common(3))
        return [
            f"{folder}: mixed series: {len(uids)} SeriesInstanceUIDs in one folder ({counts}); "
            "put each series in its own folder"
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
