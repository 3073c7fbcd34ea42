"""README's first command, `icmd_auto demo`, run as a user runs it (with a short training budget)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
from conftest import run_cli


def test_demo_plans_trains_predicts_and_evaluates_within_its_budget(tmp_path):
    work = tmp_path / "icmd_demo"
    result = run_cli("demo", "--work", str(work), "--minutes", "0.1")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for step in (
        "[1/5] synthetic phantom",
        "[2/5] plan: factor 3",
        "[3/5] trained",
        "[4/5] predicted",
        "[5/5]",
    ):
        assert step in result.stdout, step
    assert "gain over linear (synthesized slices)" in result.stdout and "demo finished" in result.stdout
    plans = json.loads((work / "plans.json").read_text())
    assert plans["training"]["value"]["time_limit_s"] == 6, "--minutes 0.1 is the training budget"
    thick = nib.load(str(work / "data" / "phantom_thick.nii.gz"))
    thin = nib.load(str(work / "phantom_icmd.nii.gz"))
    assert thin.shape == (96, 96, 73) and np.allclose(thin.header.get_zooms(), (1.5, 1.5, 1.5))
    assert np.array_equal(np.asanyarray(thin.dataobj)[..., ::3], np.asanyarray(thick.dataobj))
    report = json.loads((work / "evaluation.json").read_text())
    assert report["num_cases"] == 1 and {"icmd", "linear", "cubic", "nearest"} <= set(report["mean"])
    psnr = {m: report["mean"][m]["psnr_syn"] for m in ("icmd", "linear", "nearest")}
    # seconds of training: near linear interpolation, far above nearest-neighbour slices
    assert psnr["icmd"] > psnr["nearest"] + 1 and abs(psnr["icmd"] - psnr["linear"]) < 1, psnr


def test_demo_help_documents_its_budget():
    result = run_cli("demo", "--help")
    assert "--minutes" in result.stdout + result.stderr
    assert "the training time budget in minutes" in result.stdout + result.stderr
