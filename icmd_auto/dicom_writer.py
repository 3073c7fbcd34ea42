"""DICOM series out: the thin-slice volume as a new CT series beside its source series.

Geometry. MONAI's PydicomReader, which reads the input, stacks a series' slices by InstanceNumber
into a volume (X, Y, Z) with X the column index and Y the row index of each slice, and gives an
affine in RAS: DICOM's LPS with the x and y rows negated. This module inverts exactly that, so that
reading the written series with ``LoadImage(reader="PydicomReader")`` returns the volume and affine
it was given: in LPS, the affine's column 0 is the row direction (ImageOrientationPatient[0:3],
times PixelSpacing[1]), column 1 the column direction (ImageOrientationPatient[3:6], times
PixelSpacing[0]), column 2 the step from one slice to the next, and column 3 the first slice's
ImagePositionPatient; slice k sits at column 3 + k * column 2 and gets InstanceNumber k + 1.

Tags. Patient, study and frame-of-reference attributes are carried over from the source series
(from a folder of several series, the one the input was read from; a UID the source leaves empty,
as anonymised data does, is generated); the series and every instance get new UIDs. Pixels are
signed 16-bit HU (RescaleSlope 1, RescaleIntercept 0), written uncompressed in explicit VR little
endian whatever the source's transfer syntax.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

from . import __version__
from .errors import ICMDError
from .template import scripts

# copied from the source series when present (Patient, General Study, Frame of Reference, and the
# acquisition descriptors a reader uses to tell series apart)
CARRIED_OVER = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "Modality",
    "Manufacturer",
    "InstitutionName",
    "BodyPartExamined",
    "PatientPosition",
    "ProtocolName",
    "KVP",
    "ConvolutionKernel",
    "WindowCenter",
    "WindowWidth",
)
SERIES_NUMBER_OFFSET = 1000  # a derived series numbered apart from its source (source number + 1000)
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def source_slices(series_dir: Path, series: Sequence[str] = ()) -> list[Dataset]:
    """The source series' headers, in MONAI's stacking order (InstanceNumber).

    ``series_dir`` may hold several series; the one taken is the one the input was read from
    (``scripts.dicom_series``, with the same ``series``: the SeriesInstanceUIDs named).
    """
    try:
        choice = scripts.dicom_series.choose_series(series_dir, series)
    except scripts.dicom_series.SeriesChoiceError as e:
        raise ICMDError(str(e)) from None
    headers = [ds for ds in choice.series.headers if "InstanceNumber" in ds]
    if not headers:
        raise ICMDError(f"{series_dir}: no DICOM slices with an InstanceNumber")
    return sorted(headers, key=lambda ds: int(ds.InstanceNumber))


def _ds(values) -> list[DSfloat]:
    """Decimal strings of at most 16 characters (the DS limit), as exact as that allows."""
    return [DSfloat(float(v), auto_format=True) for v in values]


def slice_geometry(affine_ras: np.ndarray, num_slices: int) -> dict:
    """ImageOrientationPatient, PixelSpacing and each slice's ImagePositionPatient from a RAS affine."""
    lps = LPS_FROM_RAS @ np.asarray(affine_ras, dtype=np.float64)
    row_step, column_step, slice_step, origin = lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3]
    spacing_x, spacing_y = float(np.linalg.norm(row_step)), float(np.linalg.norm(column_step))
    normal = np.cross(row_step / spacing_x, column_step / spacing_y)
    positions = [origin + k * slice_step for k in range(num_slices)]
    return {
        "orientation": np.concatenate([row_step / spacing_x, column_step / spacing_y]),
        "pixel_spacing": (spacing_y, spacing_x),  # DICOM order: between rows, between columns
        "slice_spacing": float(np.linalg.norm(slice_step)),
        "positions": positions,
        "locations": [float(np.dot(p, normal)) for p in positions],
    }


def _series_header(source: Dataset, factor: int, now: datetime) -> Dataset:
    ds = Dataset()
    for keyword in CARRIED_OVER:
        if keyword in source:
            setattr(ds, keyword, source[keyword].value)
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID"):
        if not str(ds.get(keyword, "") or ""):
            setattr(ds, keyword, generate_uid())
    ds.Modality = source.get("Modality", "CT") or "CT"
    ds.SOPClassUID = CTImageStorage
    ds.SeriesInstanceUID = generate_uid()
    number = source.get("SeriesNumber")
    ds.SeriesNumber = (int(number) if number not in (None, "") else 0) + SERIES_NUMBER_OFFSET
    ds.SeriesDescription = f"{source.get('SeriesDescription', '') or 'CT'} ICMD x{factor}"[:64]
    image_type = list(source.get("ImageType", [])) or ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageType = ["DERIVED", "SECONDARY", *image_type[2:3]]
    ds.DerivationDescription = (
        f"ICMD slice synthesis x{factor} (icmd_auto {__version__}): every {factor}th slice is a source "
        f"slice, the {factor - 1} between each pair are synthesized"
    )[:1024]
    ds.SoftwareVersions = f"icmd_auto {__version__}"
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1  # signed: HU below zero are stored as they are
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    return ds


def write_dicom_series(
    volume: np.ndarray,
    affine_ras: np.ndarray,
    source_dir: Path,
    out_dir: Path,
    factor: int,
    series: Sequence[str] = (),
) -> list[Path]:
    """Write ``volume`` (X, Y, Z) in HU as a DICOM series into the empty or new folder ``out_dir``.

    ``affine_ras`` is the volume's affine in MONAI's convention (what ``LoadImage`` gives and the
    NIfTI output holds); ``source_dir`` is the folder of the series the volume was synthesised
    from (``series``: the SeriesInstanceUIDs named where it holds several). Values are rounded to
    integer HU and must fit int16. Returns the files, in slice order.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ICMDError(f"a DICOM series needs a 3-D volume, got shape {volume.shape}")
    hu = np.rint(volume.astype(np.float64))
    if hu.min() < np.iinfo(np.int16).min or hu.max() > np.iinfo(np.int16).max:
        raise ICMDError(f"HU range {hu.min():g} .. {hu.max():g} does not fit 16-bit DICOM pixels")
    pixels = hu.astype("<i2")
    x_size, y_size, num_slices = pixels.shape
    geometry = slice_geometry(affine_ras, num_slices)
    header = _series_header(source_slices(source_dir, series)[0], factor, datetime.now())
    header.Rows, header.Columns = y_size, x_size
    header.ImageOrientationPatient = _ds(geometry["orientation"])
    header.PixelSpacing = _ds(geometry["pixel_spacing"])
    header.SliceThickness = DSfloat(geometry["slice_spacing"], auto_format=True)
    header.SpacingBetweenSlices = DSfloat(geometry["slice_spacing"], auto_format=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(num_slices)))
    written = []
    for k in range(num_slices):
        ds = copy.deepcopy(header)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = _ds(geometry["positions"][k])
        ds.SliceLocation = DSfloat(geometry["locations"][k], auto_format=True)
        # rows are Y, columns are X (MONAI swaps the two axes when it reads)
        ds.PixelData = np.ascontiguousarray(pixels[:, :, k].T).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = out_dir / f"IM_{k + 1:0{width}d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def write_prediction_series(
    prediction: Path,
    source_dir: Path,
    source_affine: np.ndarray,
    factor: int,
    out_dir: Path,
    series: Sequence[str] = (),
) -> list[Path]:
    """The bundle's NIfTI prediction for the series in ``source_dir`` (``series``: the
    SeriesInstanceUIDs named where it holds several) as a DICOM series in ``out_dir``.

    Voxels come from the prediction file; the geometry from the source series' own affine (float64,
    as MONAI read it) with the slice step divided by ``factor``, checked against the prediction's
    affine (which NIfTI stores in float32).
    """
    import nibabel as nib

    image = nib.load(str(prediction))
    affine = scripts.io.upsampled_affine(source_affine, factor).numpy()
    if not np.allclose(affine, image.affine, atol=1e-3):
        raise ICMDError(
            f"{prediction}: its affine does not match the source series' geometry; refusing to write DICOM"
        )
    return write_dicom_series(np.asanyarray(image.dataobj), affine, source_dir, out_dir, factor, series)
