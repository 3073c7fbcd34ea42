"""DICOM series in, DICOM series out, on the real Siemens CT series (JPEG 2000, anonymised UIDs)."""

from __future__ import annotations

import zipfile

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import DICOM_SERIES, TINY_TRAIN, run_bundle, run_cli, write_dataset
from monai.transforms import LoadImage
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from icmd_auto import api
from icmd_auto.errors import ICMDError

pytestmark = pytest.mark.skipif(
    not DICOM_SERIES.exists(), reason=f"real CT DICOM series not found at {DICOM_SERIES}"
)
FACTOR = 2  # the series: 20 slices 2 mm apart -> 39 slices 1 mm apart


@pytest.fixture(scope="module")
def dicom_work(tmp_path_factory):
    """A tiny bundle planned and briefly trained on the DICOM series itself, x2."""
    root = tmp_path_factory.mktemp("dicom_work")
    dataset = write_dataset(root / "dataset.json", [DICOM_SERIES])
    api.plan(dataset, root / "work", preset="tiny", memory_gb=4, factor=FACTOR)
    result = run_bundle(root / "work" / "bundle", ["train.json"], TINY_TRAIN)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root / "work"


@pytest.fixture(scope="module")
def nifti_prediction(dicom_work, tmp_path_factory):
    return api.predict(
        dicom_work, DICOM_SERIES, tmp_path_factory.mktemp("nifti") / "series.nii.gz", quiet=True
    )


def source_series():
    return sorted((pydicom.dcmread(p) for p in DICOM_SERIES.iterdir()), key=lambda ds: int(ds.InstanceNumber))


def hu(ds) -> np.ndarray:
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_dicom_series_out_matches_the_nifti_prediction(dicom_work, nifti_prediction, tmp_path):
    out = tmp_path / "thin_series"
    out.mkdir()
    (out / "old.txt").write_text("an earlier result")
    with pytest.raises(ICMDError, match="exists; pass --overwrite to replace it"):
        api.predict(dicom_work, DICOM_SERIES, out, output_format="dicom")
    assert (out / "old.txt").is_file()
    result = run_cli(
        "predict", "--work", str(dicom_work), "--input", str(DICOM_SERIES), "--output", str(out),
        "--output_format", "dicom", "--overwrite",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(tmp_path.glob(".icmd_predict_*")), "no temporary folder is left behind"

    files = sorted(out.iterdir())
    assert len(files) == (20 - 1) * FACTOR + 1 and not (out / "old.txt").exists()
    written = [pydicom.dcmread(f) for f in files]
    source = source_series()
    first = source[0]
    assert str(first.SeriesInstanceUID) == "" and str(first.StudyInstanceUID) == "", (
        "the sample is anonymised"
    )
    # UIDs: one new series, a new instance UID per file, one study
    series_uids = {str(ds.SeriesInstanceUID) for ds in written}
    assert len(series_uids) == 1 and "" not in series_uids
    assert len({str(ds.SOPInstanceUID) for ds in written}) == len(written)
    assert len({str(ds.StudyInstanceUID) for ds in written}) == 1 and written[0].StudyInstanceUID != ""
    for ds in written:
        assert ds.SOPClassUID == CTImageStorage and ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    # patient and study tags carried over
    for keyword in (
        "PatientWeight",
        "PatientPosition",
        "IssuerOfPatientID",
        "StudyDate",
        "FrameOfReferenceUID",
    ):
        assert all(ds.get(keyword) == first.get(keyword) for ds in written), keyword
    # geometry: every slice 1 mm further along the source's own direction, in-plane unchanged
    step = (np.array(source[-1].ImagePositionPatient) - np.array(first.ImagePositionPatient)) / (
        len(source) - 1
    )
    for k, ds in enumerate(written):
        assert ds.InstanceNumber == k + 1
        assert np.allclose(ds.ImagePositionPatient, np.array(first.ImagePositionPatient) + k * step / FACTOR)
        assert ds.ImageOrientationPatient == first.ImageOrientationPatient
        assert ds.PixelSpacing == first.PixelSpacing
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == 1.0
    for ds, src in zip(written[::FACTOR], source):
        assert ds.ImagePositionPatient == src.ImagePositionPatient, "known slices sit where they were"
    # HU through RescaleSlope / RescaleIntercept; known slices are the source's HU
    assert all(ds.PixelRepresentation == 1 and ds.BitsAllocated == 16 for ds in written)
    thin = np.stack([hu(ds) for ds in written])
    assert np.array_equal(thin[::FACTOR], np.stack([hu(ds) for ds in source]))
    # read back as MONAI reads a series: exactly the NIfTI prediction's voxels and affine
    reread = LoadImage(reader="PydicomReader", image_only=True)(str(out))
    nifti = LoadImage(reader="NibabelReader", image_only=True)(str(nifti_prediction))
    assert reread.shape == nifti.shape == (512, 512, 39)
    assert np.array_equal(np.asarray(reread), np.asarray(nifti))
    assert np.array_equal(np.asarray(reread.affine), np.asarray(nifti.affine))


def test_dicom_output_refuses_what_it_cannot_write(dicom_work, nifti_prediction, tmp_path):
    with pytest.raises(ICMDError, match="needs a DICOM series folder as input"):
        api.predict(dicom_work, nifti_prediction, tmp_path / "out", output_format="dicom")
    with pytest.raises(ICMDError, match="the output is a folder for the new series"):
        api.predict(dicom_work, DICOM_SERIES, tmp_path / "out.nii.gz", output_format="dicom")
    with pytest.raises(ICMDError, match="--output_format 'png': choose one of nifti, dicom"):
        api.predict(dicom_work, DICOM_SERIES, tmp_path / "out", output_format="png")
    assert list(tmp_path.iterdir()) == []


def test_exported_bundle_alone_reads_the_dicom_series(dicom_work, nifti_prediction, tmp_path):
    api.export(dicom_work, tmp_path / "icmd_series_x2.zip")
    with zipfile.ZipFile(tmp_path / "icmd_series_x2.zip") as zf:
        zf.extractall(tmp_path)
    out = tmp_path / "out"
    result = run_bundle(
        tmp_path / "icmd_series_x2",
        ["inference.json"],
        {"dataset_dir": str(DICOM_SERIES), "output_dir": str(out)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    alone, ours = nib.load(str(out / f"{DICOM_SERIES.name}_icmd.nii.gz")), nib.load(str(nifti_prediction))
    assert alone.get_data_dtype() == ours.get_data_dtype() == np.int16
    assert np.array_equal(alone.affine, ours.affine)
    diff = np.abs(np.asanyarray(alone.dataobj).astype(float) - np.asanyarray(ours.dataobj).astype(float))
    assert diff.max() < 1e-4
