"""Prediction geometry on real CT, and the simulated-thick evaluation."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import requires_shared_data, run_cli, write_dataset

from icmd_auto import api
from icmd_auto.errors import ICMDError


@requires_shared_data
def test_predict_keeps_geometry_and_known_slices(tiny_work, chest_x3, tmp_path):
    out = tmp_path / "chest_thin.nii.gz"
    result = run_cli("predict", "--work", str(tiny_work), "--input", str(chest_x3), "--output", str(out))
    assert result.returncode == 0, result.stderr
    thick, thin = nib.load(str(chest_x3)), nib.load(str(out))
    z = thick.shape[2]
    assert thin.shape == (122, 102, (z - 1) * 3 + 1)
    expected = thick.affine.copy()
    expected[:3, 2] /= 3
    assert np.array_equal(thin.affine, expected), "same orientation and origin, z-spacing / r"
    assert nib.aff2axcodes(thin.affine) == nib.aff2axcodes(thick.affine) == ("L", "P", "S")
    assert thin.get_data_dtype() == thick.get_data_dtype() == np.int16
    known = np.asanyarray(thin.dataobj)[:, :, ::3]
    assert np.array_equal(known, np.asanyarray(thick.dataobj)), "known slices are bit-exact"
    # an existing output is not overwritten without --overwrite
    again = run_cli("predict", "--work", str(tiny_work), "--input", str(chest_x3), "--output", str(out))
    assert again.returncode != 0 and "pass --overwrite" in again.stderr
    assert not list(tmp_path.glob(".icmd_predict_*")), "no temporary files are left behind"


@requires_shared_data
def test_predict_refuses_bad_input_with_one_line(tiny_work, tmp_path):
    missing = run_cli(
        "predict",
        "--work",
        str(tiny_work),
        "--input",
        str(tmp_path / "nope.nii.gz"),
        "--output",
        str(tmp_path / "o.nii.gz"),
    )
    assert missing.returncode == 1 and missing.stderr.strip().endswith("nope.nii.gz: file not found")
    assert "Traceback" not in missing.stderr and not (tmp_path / "o.nii.gz").exists()


@requires_shared_data
def test_evaluate_reports_psnr_and_ssim_against_baselines(tiny_work, tmp_path):
    from conftest import CHEST

    dataset = write_dataset(tmp_path / "dataset.json", [CHEST], test=[CHEST])
    report = api.evaluate(tiny_work, dataset, out=tmp_path / "report.json", quiet=True)
    assert json.loads((tmp_path / "report.json").read_text())["factor"] == 3
    mean = report["mean"]
    for method in ("icmd", "linear", "cubic", "nearest"):
        assert set(mean[method]) == {"psnr_all", "psnr_syn", "ssim_a", "ssim_c", "ssim_s"}
    # known slices are exact, so whole-volume PSNR exceeds synthesized-slice PSNR by about 10 log10(r/(r-1))
    for method in ("icmd", "linear"):
        assert mean[method]["psnr_all"] - mean[method]["psnr_syn"] == pytest.approx(
            10 * np.log10(3 / 2), abs=0.05
        )
    assert mean["linear"]["psnr_syn"] == pytest.approx(30.2, abs=1.5)  # the real chest at x3
    assert np.isfinite(mean["gain_over_linear_psnr_syn"])


def test_predict_without_a_bundle_says_what_to_do(tmp_path):
    with pytest.raises(ICMDError, match="run `icmd_auto plan` first"):
        api.predict(tmp_path, tmp_path / "a.nii.gz", tmp_path / "b.nii.gz")
