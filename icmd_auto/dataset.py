"""Reading ``dataset.json`` in the MSD / nnU-Net form.

    {
      "name": "chest_thick",
      "channel_names": {"0": "CT"},          # or "modality": {"0": "CT"}
      "training": [{"image": "imagesTr/case_000.nii.gz"}, ...],
      "test": ["imagesTs/case_100.nii.gz", ...],   # or [{"image": ...}]
      # a DICOM folder holding several series: {"image": "export/", "series": "<SeriesInstanceUID>"}
      "factor": 3,                           # optional
      "target_spacing_z": 1.5,               # optional, mm
      "slice_profile": "removal"             # optional: "removal" | "average"
    }

Paths are relative to the file. An image is a NIfTI file or a DICOM folder: one series, or a
study export whose series is its only axial CT series or the one an entry's "series" names.
Labels are never needed and are ignored when present.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ICMDError

SLICE_PROFILES = ("removal", "average")


@dataclass
class DatasetSpec:
    """A dataset.json, resolved: absolute image paths and the optional method keys."""

    path: Path
    name: str
    training: list[Path]
    test: list[Path] = field(default_factory=list)
    factor: int | None = None
    target_spacing_z: float | None = None
    slice_profile: str | None = None
    # image path (as str) -> the SeriesInstanceUID its entry names, for DICOM folders of several series
    entry_series: dict[str, str] = field(default_factory=dict)

    def series_named(self) -> list[str]:
        """The SeriesInstanceUIDs the entries name."""
        return sorted(set(self.entry_series.values()))


def _entry(entry: object, root: Path, where: str) -> tuple[Path, str | None]:
    """An entry's image path and the series it names (None when it names none)."""
    series = None
    if isinstance(entry, dict):
        if "image" not in entry:
            raise ICMDError(f"{where}: entry {entry!r} has no 'image' key")
        series = entry.get("series")
        if series is not None and (not isinstance(series, str) or not series.strip()):
            raise ICMDError(f"{where}: 'series' must be a SeriesInstanceUID (a string), got {series!r}")
        entry = entry["image"]
    if not isinstance(entry, str) or not entry:
        raise ICMDError(f"{where}: entry {entry!r} is not a path")
    path = Path(entry)
    return (path if path.is_absolute() else (root / path)), (series.strip() if series else None)


def read_dataset_json(path: str | Path) -> DatasetSpec:
    """Parse and validate the structure of a dataset.json (not the images: see integrity.py).

    Raises:
        ICMDError: the file is missing, not JSON, or lacks the keys the planner needs.
    """
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise ICMDError(f"{path}: dataset.json not found")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ICMDError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ICMDError(f"{path}: expected a JSON object with a 'training' list")
    channels = raw.get("channel_names", raw.get("modality", {"0": "CT"}))
    if not isinstance(channels, dict) or len(channels) != 1:
        raise ICMDError(f"{path}: exactly one channel is supported, found channel_names={channels!r}")
    modality = str(next(iter(channels.values())))
    if modality.upper() != "CT":
        raise ICMDError(
            f"{path}: channel 0 is {modality!r}; ICMD-Auto is built for CT (channel_names {{'0': 'CT'}})"
        )
    training = raw.get("training")
    if not isinstance(training, list) or not training:
        raise ICMDError(f"{path}: 'training' must be a non-empty list of images")
    root = path.parent
    entries = {
        part: [_entry(e, root, f"{path.name} {part}[{i}]") for i, e in enumerate(items)]
        for part, items in (("training", training), ("test", raw.get("test") or []))
    }
    spec = DatasetSpec(
        path=path,
        name=str(raw.get("name", path.parent.name)),
        training=[image for image, _ in entries["training"]],
        test=[image for image, _ in entries["test"]],
        entry_series={str(image): uid for part in entries.values() for image, uid in part if uid},
    )
    if raw.get("factor") is not None:
        factor = raw["factor"]
        if not isinstance(factor, int) or isinstance(factor, bool) or factor < 2:
            raise ICMDError(f"{path}: 'factor' must be an integer >= 2, got {factor!r}")
        spec.factor = factor
    if raw.get("target_spacing_z") is not None:
        tz = raw["target_spacing_z"]
        if not isinstance(tz, (int, float)) or isinstance(tz, bool) or tz <= 0:
            raise ICMDError(f"{path}: 'target_spacing_z' must be a positive number (mm), got {tz!r}")
        spec.target_spacing_z = float(tz)
    if raw.get("slice_profile") is not None:
        if raw["slice_profile"] not in SLICE_PROFILES:
            raise ICMDError(
                f"{path}: 'slice_profile' must be one of {SLICE_PROFILES}, got {raw['slice_profile']!r}"
            )
        spec.slice_profile = raw["slice_profile"]
    return spec


def write_dataset_json(path: str | Path, training: list[str], test: list[str] | None = None, **extra) -> Path:
    """Write a minimal dataset.json (used by the demo, the benchmark and the tests)."""
    path = Path(path)
    doc = {
        "name": extra.pop("name", path.parent.name),
        "channel_names": {"0": "CT"},
        "training": [{"image": p} for p in training],
        "test": list(test or []),
    }
    doc.update(extra)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path
