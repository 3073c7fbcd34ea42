"""Which DICOM series of a folder is the volume: export folders with several series.

A folder as a PACS or a scanner console writes it often holds several series at once (a localizer,
a 5 mm and two 1 mm reconstructions with different kernels), in one folder or in one subfolder
each, beside DICOM objects that are not images (a DICOMDIR index, dose reports, presentation
states). MONAI's PydicomReader would stack all of it into one volume. Here the DICOM files of the
folder and of its subfolders are grouped by SeriesInstanceUID from their headers alone; an object
without Rows and Columns is not an image and is left aside. The volume is, in this order:

1. the series named in ``series`` (SeriesInstanceUIDs; being unique, one list serves any number
   of folders, and a folder that holds none of them goes on to 2.);
2. the folder's only image series (a plain series folder: the integrity checks, not this choice,
   say what is wrong with it);
3. its only candidate: a CT series of two or more axial slices that is not a localizer.

Several candidates and no choice is a refusal that lists them (SeriesInstanceUID,
SeriesDescription, slice count, thickness, kernel). Files with an empty SeriesInstanceUID (as
anonymised data has) form one series that cannot be named.

``DicomSeriesReader`` is MONAI's PydicomReader reading a folder this way; the bundle's configs pass
their key ``dicom_series`` to it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from monai.data import PydicomReader
from monai.utils import ensure_tuple, optional_import

pydicom, _ = optional_import("pydicom")

logger = logging.getLogger(__name__)

NO_UID = "(no SeriesInstanceUID)"
MIN_SLICES = 2  # one slice is no volume
ORIENTATION_TOLERANCE = 1e-3  # direction cosines
# the anatomical plane of a slice, by the patient axis (x, y, z) its normal is closest to
PLANES = ("sagittal", "coronal", "axial")
HINT = "name one with --dicom_series <SeriesInstanceUID> (a config key)"


class SeriesChoiceError(ValueError):
    """No one series of a folder can be taken; the message (one line) says why and lists them."""


def has_dicom_marker(path: str | Path) -> bool:
    """A DICOM file by the 'DICM' marker after the 128-byte preamble (what MONAI's reader needs)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _walk(folder: Path):
    """(folder, file names) for ``folder`` and its subfolders, sorted; hidden folders are skipped
    (a tool's temporary output beside the input is not part of it)."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield Path(root), sorted(files)


def dicom_files(folder: str | Path) -> list[Path]:
    """The DICOM files of ``folder`` and of its subfolders, sorted."""
    return [root / f for root, files in _walk(Path(folder)) for f in files if has_dicom_marker(root / f)]


def is_series_export(folder: str | Path) -> bool:
    """Two or more subfolders of ``folder`` (at any depth) hold DICOM files, all of one study (one
    non-empty StudyInstanceUID): the folder-per-series layout of a study export."""
    folder, studies, holding = Path(folder), set(), 0
    for root, files in _walk(folder):
        if root == folder:
            continue
        first = next((root / f for f in files if has_dicom_marker(root / f)), None)
        if first is None:
            continue
        try:
            ds = pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        except Exception:  # noqa: BLE001  an unreadable header is the integrity check's to report
            return False
        studies.add(str(ds.get("StudyInstanceUID", "") or ""))
        if "" in studies or len(studies) > 1:
            return False
        holding += 1
    return holding >= 2


def series_uids(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """SeriesInstanceUIDs from a config or option value: None, one UID, 'uid1,uid2', or a list."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return tuple(uid.strip() for uid in items if uid.strip())


@dataclass
class DicomSeries:
    """One image series of a folder: its files (sorted by path) and their headers (no pixels)."""

    uid: str
    files: list[Path] = field(default_factory=list)
    headers: list = field(default_factory=list)

    def _first(self, keyword: str):
        value = self.headers[0].get(keyword)
        return "" if value is None else value

    @property
    def description(self) -> str:
        return str(self._first("SeriesDescription")).strip()

    @property
    def thickness_mm(self) -> float | None:
        try:
            return float(self._first("SliceThickness"))
        except (TypeError, ValueError):
            return None

    @property
    def kernel(self) -> str:
        value = self._first("ConvolutionKernel")
        values = [value] if isinstance(value, str) else list(value)
        return "\\".join(str(v).strip() for v in values if str(v).strip())

    def unsuitable(self) -> str | None:
        """Why this series is not an axial CT volume; None when it is one."""
        image_type = {str(v).upper() for ds in self.headers for v in (ds.get("ImageType") or [])}
        if "LOCALIZER" in image_type:
            return "localizer"
        modality = str(self._first("Modality")).upper()
        if modality and modality != "CT":
            return f"modality {modality}"
        if len(self.headers) < MIN_SLICES:
            return f"{len(self.headers)} slice"
        orientations = [ds.get("ImageOrientationPatient") for ds in self.headers]
        if any(o is None or len(o) != 6 for o in orientations) or any(
            ds.get("ImagePositionPatient") is None for ds in self.headers
        ):
            return "no slice geometry"
        orientations = np.array(orientations, dtype=np.float64)
        if not np.allclose(orientations, orientations[0], atol=ORIENTATION_TOLERANCE):
            return "mixed orientations"
        normal = np.cross(orientations[0, :3], orientations[0, 3:])
        plane = PLANES[int(np.argmax(np.abs(normal)))]
        return None if plane == "axial" else plane

    def summary(self, reason: bool = False) -> str:
        """``UID "description" (N slices, T mm, kernel K)``; with ``reason``, why it is no candidate."""
        thickness = f"{self.thickness_mm:g} mm" if self.thickness_mm is not None else "thickness unknown"
        kernel = f"kernel {self.kernel}" if self.kernel else "kernel unknown"
        why = self.unsuitable() if reason else None
        description = f' "{self.description}"' if self.description else ""
        return (
            f"{self.uid or NO_UID}{description} ({len(self.files)} slices, {thickness}, {kernel}"
            f"{': ' + why if why else ''})"
        )


@dataclass
class FolderScan:
    """What a folder holds, from the headers of its DICOM files (and its subfolders')."""

    folder: Path
    series: list[DicomSeries]  # image series, in the order their first file comes
    non_images: list[Path]  # DICOM objects without Rows and Columns (DICOMDIR, reports, ...)
    unreadable: list[tuple[Path, str]]  # (file, reason)


def scan_folder(folder: str | Path) -> FolderScan:
    folder = Path(folder)
    groups: dict[str, DicomSeries] = {}
    non_images, unreadable = [], []
    for path in dicom_files(folder):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as e:  # noqa: BLE001  pydicom raises several types for broken headers
            unreadable.append((path, f"{type(e).__name__}: {e}"))
            continue
        if ds.get("Rows") in (None, "") or ds.get("Columns") in (None, ""):
            non_images.append(path)
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
        series = groups.setdefault(uid, DicomSeries(uid))
        series.files.append(path)
        series.headers.append(ds)
    return FolderScan(folder, list(groups.values()), non_images, unreadable)


@dataclass
class SeriesChoice:
    """The series taken from a folder, and what was left aside."""

    folder: Path
    series: DicomSeries
    others: list[DicomSeries]
    non_images: list[Path]
    named: bool = False  # taken because ``series`` named it

    @property
    def notable(self) -> bool:
        """The folder held more than the series (worth naming the series to the user)."""
        return bool(self.others or self.non_images)

    def describe(self) -> str:
        """One line: the folder, the series taken, what was ignored."""
        ignored = []
        if self.others:
            ignored.append(
                f"{len(self.others)} other series ({'; '.join(s.summary(reason=True) for s in self.others)})"
            )
        if self.non_images:
            names = ", ".join(p.name for p in self.non_images[:3]) + (
                ", ..." if len(self.non_images) > 3 else ""
            )
            ignored.append(f"{len(self.non_images)} non-image DICOM file(s) ({names})")
        return f"{self.folder}: using series {self.series.summary()}" + (
            f"; ignored {' and '.join(ignored)}" if ignored else ""
        )


def choose_series(
    folder: str | Path,
    series: str | Sequence[str] | None = None,
    strict: bool = False,
    hint: str = HINT,
    scan: FolderScan | None = None,
) -> SeriesChoice:
    """The series of ``folder`` that is the volume (the rule is in the module docstring).

    Args:
        series: SeriesInstanceUIDs to take where the folder holds one of them.
        strict: the folder must hold one of ``series`` (a choice made for this folder alone).
        hint: how the user names a series, ending the refusal of several candidates.
        scan: the folder's scan, when the caller has made it.

    Raises:
        SeriesChoiceError: one line naming the folder (no images, none or several candidates, a
            named series missing or two named ones present).
    """
    folder = Path(folder)
    wanted = series_uids(series)
    scan = scan or scan_folder(folder)
    if scan.unreadable:
        path, reason = scan.unreadable[0]
        raise SeriesChoiceError(f"{folder}: {path.relative_to(folder)}: unreadable DICOM header ({reason})")
    if not scan.series:
        if scan.non_images:
            raise SeriesChoiceError(
                f"{folder}: no DICOM images, only {len(scan.non_images)} non-image DICOM file(s) "
                f"(e.g. {scan.non_images[0].name})"
            )
        raise SeriesChoiceError(f"{folder}: no DICOM files (none has the 'DICM' marker)")

    def taken(chosen: DicomSeries, named: bool = False) -> SeriesChoice:
        return SeriesChoice(
            folder, chosen, [s for s in scan.series if s is not chosen], scan.non_images, named
        )

    def listing(items: list[DicomSeries], reason: bool = False) -> str:
        return "; ".join(s.summary(reason) for s in items)

    named = [s for s in scan.series if s.uid and s.uid in wanted]
    if len(named) > 1:
        raise SeriesChoiceError(
            f"{folder}: {len(named)} of the series named are in this folder ({listing(named)}); name one"
        )
    if named:
        return taken(named[0], named=True)
    if strict and wanted:
        raise SeriesChoiceError(
            f"{folder}: no series {' or '.join(wanted)} here; its series: {listing(scan.series, reason=True)}"
        )
    if len(scan.series) == 1:
        return taken(scan.series[0])
    candidates = [s for s in scan.series if s.unsuitable() is None]
    if len(candidates) == 1:
        return taken(candidates[0])
    if not candidates:
        raise SeriesChoiceError(
            f"{folder}: none of its {len(scan.series)} image series is an axial CT volume: "
            f"{listing(scan.series, reason=True)}"
        )
    aside = len(scan.series) - len(candidates)
    aside = (
        f" (and {aside} other series that {'is not an axial CT volume' if aside == 1 else 'are not axial CT volumes'})"
        if aside
        else ""
    )
    raise SeriesChoiceError(
        f"{folder}: {len(candidates)} axial CT series{aside}; {hint}: {listing(candidates)}"
    )


class DicomSeriesReader(PydicomReader):
    """MONAI's PydicomReader, reading a folder as the one series ``choose_series`` takes from it.

    Anything else (a file, a list of files) is read as PydicomReader reads it. A series found
    (not named) in a folder that holds more is logged at INFO, with what was left aside.

    Args:
        series: SeriesInstanceUIDs to take where a folder holds several series (None, one UID,
            'uid1,uid2' or a list); a folder holding none of them gets its only candidate.
        log_choice: log the series found (off where the caller names it to the user itself).
        kwargs: PydicomReader's arguments.
    """

    def __init__(self, series: str | Sequence[str] | None = None, log_choice: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.series = series_uids(series)
        self.log_choice = log_choice
        self._refusal: Exception | None = None

    def read(self, data, **kwargs):
        self._refusal = None
        names = ensure_tuple(data)
        if len(names) != 1 or not Path(f"{names[0]}").is_dir():
            return super().read(data, **kwargs)
        try:
            choice = choose_series(f"{names[0]}", self.series)
            files = [str(p) for p in choice.series.files]
            options = {**self.kwargs, **kwargs}
            slices = [pydicom.dcmread(f, **options) for f in files]
        except Exception as e:  # noqa: BLE001  raised by get_data, see there
            self._refusal = e
            return []
        if self.log_choice and choice.notable and not choice.named:
            logger.info(choice.describe())
        # what PydicomReader.read leaves for get_data after reading a folder
        self.has_series = len(slices) > 1
        self.filenames = [files] if self.has_series else files
        return slices if self.has_series else slices[0]

    def get_data(self, data):
        # LoadImage tries its other readers when ``read`` raises, and MONAI's own PydicomReader would
        # then stack every file of the folder, several series included: the refusal (or a broken
        # file) is raised here instead, which LoadImage passes on as it is.
        if self._refusal is not None:
            refusal, self._refusal = self._refusal, None
            raise refusal
        return super().get_data(data)
