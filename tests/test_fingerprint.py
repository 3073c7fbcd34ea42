"""The fingerprint: facts about the real CT, checked against nibabel and numpy directly."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
from conftest import ABDOMEN, CHEST, DICOM_SERIES, requires_shared_data, write_dataset

from icmd_auto.dataset import read_dataset_json
from icmd_auto.fingerprint import dataset_fingerprint, write_fingerprint
from icmd_auto.integrity import verify_dataset_integrity


@requires_shared_data
def test_fingerprint_numbers_on_real_ct(tmp_path):
    spec = read_dataset_json(write_dataset(tmp_path / "dataset.json", [CHEST, ABDOMEN, DICOM_SERIES]))
    report = verify_dataset_integrity(spec)
    fp = dataset_fingerprint(report.cases, report.samples, "real")
    chest, abdomen, dicom = fp["cases"]
    assert chest["shape"] == [122, 102, 112] and chest["spacing"] == [1.5, 1.5, 1.5]
    assert chest["orientation"] == "LPS" and chest["dtype"] == "int16"
    assert abdomen["orientation"] == "RAS" and abdomen["spacing"] == [3.0, 3.0, 3.0]
    reference = np.asanyarray(nib.load(str(CHEST)).dataobj)
    expected = np.percentile(reference, [0.5, 50, 99.5])
    got = [chest["intensity"][k] for k in ("p0.5", "p50", "p99.5")]
    np.testing.assert_allclose(got, expected)
    # the DICOM series: 20 slices 2 mm apart, HU via RescaleSlope/Intercept (air at -1024)
    assert dicom["shape"] == [512, 512, 20]
    np.testing.assert_allclose(dicom["spacing"], [0.9765625, 0.9765625, 2.0], atol=1e-5)
    assert dicom["intensity"]["min"] == -1024
    np.testing.assert_allclose(fp["median_spacing"], [1.5, 1.5, 2.0])
    # dataset intensity: pooled percentiles and the clipped mean/std lie within the window
    it = fp["intensity"]
    assert it["p0.5"] < it["mean"] < it["p99.5"] and it["std"] > 100
    path = write_fingerprint(fp, tmp_path / "fingerprint.json")
    assert json.loads(path.read_text())["num_cases"] == 3
