"""The dataset integrity check: every problem reported with its file, all at once, no traceback."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import run_cli, write_dataset

from icmd_auto.dataset import read_dataset_json
from icmd_auto.errors import DatasetIntegrityError, ICMDError
from icmd_auto.integrity import verify_dataset_integrity
from icmd_auto.synthetic import ct_phantom, save_nifti


def _nifti(path, array, spacing=(1.0, 1.0, 3.0)):
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0][:4])), str(path))
    return path


@pytest.fixture()
def good(tmp_path):
    path = tmp_path / "good.nii.gz"
    save_nifti(ct_phantom((32, 32, 12), (1.0, 1.0, 3.0)), (1.0, 1.0, 3.0), str(path))
    return path


def problems_of(tmp_path, images):
    spec = read_dataset_json(write_dataset(tmp_path / "dataset.json", images))
    with pytest.raises(DatasetIntegrityError) as err:
        verify_dataset_integrity(spec)
    return err.value.problems


def test_missing_file_is_named(tmp_path, good):
    (problem,) = problems_of(tmp_path, [good, tmp_path / "absent.nii.gz"])
    assert "absent.nii.gz" in problem and "not found" in problem


def test_non_image_file_is_named(tmp_path, good):
    fake = tmp_path / "notes.nii.gz"
    fake.write_text("this is not an image")
    (problem,) = problems_of(tmp_path, [good, fake])
    assert "notes.nii.gz" in problem and "cannot be read" in problem


def test_wrong_suffix_is_named(tmp_path, good):
    other = tmp_path / "scan.mha"
    other.write_bytes(b"\x00" * 64)
    (problem,) = problems_of(tmp_path, [good, other])
    assert "scan.mha" in problem and "not a NIfTI" in problem


def test_2d_image_is_named(tmp_path, good):
    flat = _nifti(tmp_path / "flat.nii.gz", np.zeros((32, 32), np.int16))
    (problem,) = problems_of(tmp_path, [good, flat])
    assert "flat.nii.gz" in problem and "2-D" in problem


def test_4d_image_is_named(tmp_path, good):
    movie = _nifti(tmp_path / "movie.nii.gz", np.zeros((16, 16, 8, 3), np.int16))
    (problem,) = problems_of(tmp_path, [good, movie])
    assert "movie.nii.gz" in problem and "4-D" in problem


def test_nan_voxels_are_named(tmp_path, good):
    data = ct_phantom((32, 32, 12), (1.0, 1.0, 3.0)).astype(np.float32)
    data[3, 4, 5] = np.nan
    data[1, 1, 1] = np.inf
    broken = _nifti(tmp_path / "broken.nii.gz", data)
    (problem,) = problems_of(tmp_path, [good, broken])
    assert "broken.nii.gz" in problem and "2 voxels are NaN or Inf" in problem


def test_non_ct_intensities_warn_but_pass(tmp_path):
    unit = _nifti(tmp_path / "unit.nii.gz", np.random.default_rng(0).random((16, 16, 8)).astype(np.float32))
    spec = read_dataset_json(write_dataset(tmp_path / "dataset.json", [unit]))
    report = verify_dataset_integrity(spec)
    assert len(report.cases) == 1
    assert "unit.nii.gz" in report.warnings[0] and "Hounsfield" in report.warnings[0]


def test_three_problems_at_once_from_the_command_line(tmp_path, good):
    fake = tmp_path / "notes.nii.gz"
    fake.write_text("not an image")
    flat = _nifti(tmp_path / "flat.nii.gz", np.zeros((32, 32), np.int16))
    dataset = write_dataset(tmp_path / "dataset.json", [good, tmp_path / "absent.nii.gz", fake, flat])
    result = run_cli("plan", "--dataset", str(dataset), "--work", str(tmp_path / "work"))
    assert result.returncode != 0
    assert "3 problem(s)" in result.stderr
    for name in ("absent.nii.gz", "notes.nii.gz", "flat.nii.gz"):
        assert name in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "work").exists(), "nothing is written when the check fails"


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('{"name": "x"}', "'training' must be a non-empty list"),
        ('{"training": [{"image": "a.nii.gz"}], "channel_names": {"0": "MRI"}}', "built for CT"),
        ('{"training": [{"image": "a.nii.gz"}], "factor": 1}', "'factor' must be an integer >= 2"),
    ],
)
def test_malformed_dataset_json(tmp_path, content, message):
    path = tmp_path / "dataset.json"
    path.write_text(content)
    with pytest.raises(ICMDError, match=message):
        read_dataset_json(path)


def test_paths_are_relative_to_the_dataset_file(tmp_path, good):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "dataset.json"
    path.write_text('{"training": [{"image": "../good.nii.gz"}], "test": ["../good.nii.gz"]}')
    spec = read_dataset_json(path)
    assert spec.training[0].resolve() == good.resolve() and spec.test[0].resolve() == good.resolve()
