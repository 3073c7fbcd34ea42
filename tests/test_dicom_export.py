"""Study exports: a folder as a PACS or a scanner console writes it, holding several series (a
localizer, a thick and two thin reconstructions with different kernels) and a DICOMDIR index, in
one folder or in one subfolder per series. Built from the real 20-slice series: copies with edited
headers (the pixel data is the real one, untouched).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import DICOM_SERIES, run_main, write_dataset
from monai.transforms import LoadImage
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from icmd_auto import api, runner
from icmd_auto.dataset import read_dataset_json
from icmd_auto.errors import DatasetIntegrityError, ICMDError
from icmd_auto.integrity import verify_dataset_integrity
from icmd_auto.synthetic import ct_phantom, save_nifti
from icmd_auto.template import TEMPLATE_DIR, scripts

pytestmark = pytest.mark.skipif(
    not DICOM_SERIES.exists(), reason=f"real CT DICOM series not found at {DICOM_SERIES}"
)

ROOT = "1.2.826.0.1.3680043.8.498.7714"
STUDY = f"{ROOT}.1"
# name -> the series as the export holds it: which source slices (0..19, 2 mm apart), and its headers
SERIES = {
    "localizer": {
        "uid": f"{ROOT}.2",
        "slices": [0, 1],
        "description": "Topogram 0.6 T20s",
        "kernel": "T20s",
        "thickness": 0.6,
    },
    "thick": {
        "uid": f"{ROOT}.3",
        "slices": list(range(0, 20, 2)),
        "description": "Thorax 4.0 Br38f",
        "kernel": "Br38f",
        "thickness": 4.0,
    },
    "thin_sharp": {
        "uid": f"{ROOT}.4",
        "slices": list(range(20)),
        "description": "Thorax 1.0 Br60f",
        "kernel": "Br60f",
        "thickness": 1.0,
    },
    "thin_soft": {
        "uid": f"{ROOT}.5",
        "slices": list(range(16)),
        "description": "Thorax 1.0 Br38f",
        "kernel": "Br38f",
        "thickness": 1.0,
    },
}
ALL = tuple(SERIES)
DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"  # the SOP class of a DICOMDIR


def source_slices() -> list[Path]:
    return sorted(
        DICOM_SERIES.iterdir(), key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber)
    )


def write_index(path: Path) -> None:
    """A DICOMDIR-style index: a DICOM file without pixels, Rows or InstanceNumber."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DIRECTORY_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    index = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    index.FileSetID = "EXPORT"
    index.DirectoryRecordSequence = []
    index.save_as(path, enforce_file_format=True)


def make_export(folder: Path, names=ALL, subfolders: bool = False, index: bool = True) -> Path:
    """``folder`` holding the series ``names`` (in it, or one subfolder each) and a DICOMDIR."""
    source = source_slices()
    folder.mkdir(parents=True)
    for name in names:
        spec = SERIES[name]
        target = folder / name if subfolders else folder
        target.mkdir(exist_ok=True)
        for k, i in enumerate(spec["slices"]):
            ds = pydicom.dcmread(source[i])
            ds.StudyInstanceUID = STUDY
            ds.SeriesInstanceUID = spec["uid"]
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{spec['uid']}.{k + 1}"
            ds.SeriesDescription = spec["description"]
            ds.ConvolutionKernel = spec["kernel"]
            ds.SliceThickness = spec["thickness"]
            ds.InstanceNumber = k + 1
            if name == "localizer":  # a frontal and a lateral topogram
                ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
                ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1] if k == 0 else [0, 1, 0, 0, 0, -1]
            ds.save_as(target / f"IM_{name}_{k + 1:04d}")
    if index:
        write_index(folder / "DICOMDIR")
    return folder


@pytest.fixture(scope="module")
def source_volume() -> np.ndarray:
    """The real series read as MONAI reads it (X, Y, Z), once for the module."""
    return np.asarray(LoadImage(reader="PydicomReader", image_only=True)(str(DICOM_SERIES)))


@pytest.fixture()
def named_log(caplog):
    """The lines icmd_auto logs (its logger may not propagate to the root once the CLI set it up)."""
    log, handler = logging.getLogger("icmd_auto"), caplog.handler
    own = not log.propagate
    if own:
        log.addHandler(handler)
    caplog.set_level(logging.INFO, logger="icmd_auto")
    yield caplog
    if own:
        log.removeHandler(handler)


def test_the_one_axial_series_of_an_export_is_taken_and_named(tmp_path, named_log):
    export = make_export(tmp_path / "export", names=("localizer", "thick"))
    spec = read_dataset_json(write_dataset(tmp_path / "dataset.json", [export]))
    (case,) = verify_dataset_integrity(spec).cases
    assert case.series == SERIES["thick"]["uid"] and case.shape == [512, 512, 10]
    np.testing.assert_allclose(case.spacing, [0.9765625, 0.9765625, 4.0], atol=1e-5)
    (line,) = [r.getMessage() for r in named_log.records if "using series" in r.getMessage()]
    assert line == (
        f'{export}: using series {SERIES["thick"]["uid"]} "Thorax 4.0 Br38f" (10 slices, 4 mm, kernel Br38f); '
        f'ignored 1 other series ({SERIES["localizer"]["uid"]} "Topogram 0.6 T20s" (2 slices, 0.6 mm, '
        "kernel T20s: localizer)) and 1 non-image DICOM file(s) (DICOMDIR)"
    )


@pytest.mark.parametrize("subfolders", [False, True], ids=["one_folder", "folder_per_series"])
def test_several_axial_series_are_refused_with_a_list(tmp_path, capfd, subfolders):
    export = make_export(tmp_path / "export", subfolders=subfolders)
    dataset = write_dataset(tmp_path / "dataset.json", [export])
    work = tmp_path / "work"
    result = run_main(capfd, "plan", "--dataset", str(dataset), "--work", str(work), "--factor", "2")
    assert result.returncode == 1 and not work.exists()
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"icmd_auto: error: {export}: 3 axial CT series (and 1 other series that is")
    assert "name one with --series UID" in line
    for name in ("thick", "thin_sharp", "thin_soft"):
        s = SERIES[name]
        count = len(s["slices"])
        assert (
            f'{s["uid"]} "{s["description"]}" ({count} slices, {s["thickness"]:g} mm, kernel {s["kernel"]})'
            in line
        )
    assert SERIES["localizer"]["uid"] not in line, "only the series that fit are listed"


@pytest.mark.parametrize(
    "subfolders, how", [(False, "option"), (True, "entry")], ids=["one_folder", "folder_per_series"]
)
def test_series_option_and_dataset_entry_pick_one(tmp_path, subfolders, how):
    export = make_export(tmp_path / "export", subfolders=subfolders)
    soft = SERIES["thin_soft"]
    if how == "option":  # --series
        spec = read_dataset_json(write_dataset(tmp_path / "dataset.json", [export]))
        (case,) = verify_dataset_integrity(spec, series=[soft["uid"]]).cases
    else:  # the dataset.json entry's "series"
        entry = tmp_path / "entry.json"
        entry.write_text(json.dumps({"training": [{"image": str(export), "series": soft["uid"]}]}))
        (case,) = verify_dataset_integrity(read_dataset_json(entry)).cases
    assert case.series == soft["uid"] and case.shape == [512, 512, 16]


def test_a_series_named_where_it_is_not_is_refused(tmp_path):
    export = make_export(tmp_path / "export", names=("localizer", "thick", "thin_soft"))
    absent = f"{ROOT}.99"
    # an entry names a series of its own folder: the refusal lists what the folder holds
    entry = tmp_path / "entry.json"
    entry.write_text(json.dumps({"training": [{"image": str(export), "series": absent}]}))
    with pytest.raises(DatasetIntegrityError) as err:
        verify_dataset_integrity(read_dataset_json(entry))
    assert str(err.value) == (
        f"{export}: no series {absent} here; its series: "
        f'{SERIES["localizer"]["uid"]} "Topogram 0.6 T20s" (2 slices, 0.6 mm, kernel T20s: localizer); '
        f'{SERIES["thick"]["uid"]} "Thorax 4.0 Br38f" (10 slices, 4 mm, kernel Br38f); '
        f'{SERIES["thin_soft"]["uid"]} "Thorax 1.0 Br38f" (16 slices, 1 mm, kernel Br38f)'
    )
    # --series must name a series some folder of the dataset holds
    phantom = tmp_path / "phantom.nii.gz"
    save_nifti(ct_phantom((16, 16, 6), (1.0, 1.0, 3.0)), (1.0, 1.0, 3.0), str(phantom))
    spec = read_dataset_json(write_dataset(tmp_path / "phantom.json", [phantom]))
    with pytest.raises(DatasetIntegrityError, match=rf"no DICOM folder holds the series named {ROOT}\.99"):
        verify_dataset_integrity(spec, series=[absent])


def test_plan_tells_the_bundle_which_series_to_train_on(tmp_path, source_volume):
    export = make_export(tmp_path / "export", subfolders=True)
    soft = SERIES["thin_soft"]
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps({"training": [{"image": "export", "series": soft["uid"]}]}))
    api.plan(dataset, tmp_path / "work", preset="tiny", memory_gb=4, factor=2)
    (case,) = json.loads((tmp_path / "work" / "fingerprint.json").read_text())["cases"]
    assert case["series"] == soft["uid"] and case["shape"] == [512, 512, 16]
    bundle = tmp_path / "work" / "bundle"
    train = json.loads((bundle / "configs" / "train.json").read_text())
    assert train["datalist"] == [str(export)] and train["dicom_series"] == [soft["uid"]]
    # the bundle's training loader, as train.json configures it, reads that series
    preprocessing = runner.config_value(bundle, ["train.json"], "train#preprocessing")
    image = preprocessing.transforms[0]({"image": train["datalist"][0]})["image"]
    assert np.array_equal(np.asarray(image[0]), source_volume[..., soft["slices"]])


def test_only_non_image_objects_is_refused(tmp_path, capfd):
    folder = tmp_path / "index_only"
    folder.mkdir()
    write_index(folder / "DICOMDIR")
    dataset = write_dataset(tmp_path / "dataset.json", [folder])
    result = run_main(capfd, "plan", "--dataset", str(dataset), "--work", str(tmp_path / "work"))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"icmd_auto: error: {folder}: no DICOM images, only 1 non-image DICOM file(s) (e.g. DICOMDIR)"
    )


@pytest.mark.parametrize(
    "configs, key",
    [
        (["train.json"], "train#preprocessing"),
        (["inference.json"], "preprocessing"),
        (["inference.json", "evaluate.json"], "preprocessing"),
    ],
    ids=["train", "inference", "evaluate"],
)
def test_the_bundle_reads_the_series_it_is_told(tmp_path, configs, key, source_volume):
    """The bundle's own loader (its configs' LoadImaged) takes the series named in dicom_series,
    refuses the ambiguous export without it, and reads a plain series folder as before."""
    export = make_export(tmp_path / "export", subfolders=True)

    def load(path: Path, **overrides):
        preprocessing = runner.config_value(TEMPLATE_DIR, configs, key, **overrides)
        return preprocessing.transforms[0]({"image": str(path)})["image"]

    soft = SERIES["thin_soft"]
    image = load(export, dicom_series=[soft["uid"]])
    assert image.shape == (1, 512, 512, 16)
    assert np.array_equal(np.asarray(image[0]), source_volume[..., soft["slices"]])
    with pytest.raises(Exception) as err:
        load(export)
    assert f"{export}: 3 axial CT series" in runner.error_summary(err.value)
    assert "name one with --dicom_series <SeriesInstanceUID>" in runner.error_summary(err.value)
    if key == "preprocessing" and "evaluate.json" in configs:  # (train and inference: test_dicom.py)
        assert np.array_equal(np.asarray(load(DICOM_SERIES)[0]), source_volume)


def test_a_folder_of_one_studys_series_is_one_input_and_other_folders_are_batches(tmp_path):
    export = make_export(tmp_path / "export", names=("thick", "thin_soft"), subfolders=True, index=False)
    assert scripts.io.is_dicom_dir(export), "one study in a folder per series: one volume"
    assert scripts.io.list_inputs(export) == [str(export)]
    batch = tmp_path / "batch"
    batch.mkdir()
    (export / "thick").rename(batch / "a")
    make_export(batch / "b", names=("thin_soft",), index=False)
    for ds_path in (batch / "b").iterdir():  # another study
        ds = pydicom.dcmread(ds_path)
        ds.StudyInstanceUID = f"{ROOT}.100"
        ds.save_as(ds_path)
    assert not scripts.io.is_dicom_dir(batch), "two studies: a folder of volumes"
    assert scripts.io.list_inputs(batch) == [str(batch / "a"), str(batch / "b")]


def test_predict_takes_the_named_series_and_writes_it_as_dicom(
    tmp_path, capfd, tiny_work, chest_x3, source_volume
):
    """`predict --series` on a study export: the bundle reads the named series (its slice count and
    its known slices show which), and the DICOM output carries that series' tags."""
    export = make_export(tmp_path / "export")
    thick = SERIES["thick"]
    factor = 3  # tiny_work's
    out = tmp_path / "thin"
    result = run_main(
        capfd, "predict", "--work", str(tiny_work), "--input", str(export), "--output", str(out),
        "--output_format", "dicom", "--series", thick["uid"], "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    written = sorted((pydicom.dcmread(f) for f in out.iterdir()), key=lambda ds: int(ds.InstanceNumber))
    assert len(written) == (len(thick["slices"]) - 1) * factor + 1
    known = np.stack([ds.pixel_array.T for ds in written[::factor]], axis=-1)  # (X, Y, Z) as MONAI reads
    assert np.array_equal(known, source_volume[..., thick["slices"]])
    first = written[0]
    assert first.StudyInstanceUID == STUDY and first.ConvolutionKernel == "Br38f"
    assert first.SeriesDescription == "Thorax 4.0 Br38f ICMD x3"
    assert first.SeriesInstanceUID not in {s["uid"] for s in SERIES.values()}

    with pytest.raises(ICMDError, match="is not a DICOM folder; a series is named only for one"):
        api.predict(tiny_work, chest_x3, tmp_path / "chest.nii.gz", series=[thick["uid"]])
    assert not (tmp_path / "chest.nii.gz").exists()
