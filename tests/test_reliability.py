"""Interruption and determinism: a killed training resumes where it stopped; predictions repeat bit-for-bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import CHEST, REPO, TINY_TRAIN, run_cli, thicken, write_dataset

from icmd_auto import api

pytestmark = pytest.mark.skipif(not CHEST.exists(), reason="real CT test data not found")
TRAIN = {**TINY_TRAIN, "epochs": 4, "iterations_per_epoch": 3, "icmd#level_start_epochs": [1, 2]}


def overrides_args(overrides):
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", str(value).replace(" ", "")]
    return args


@pytest.fixture(scope="module")
def thick_crop(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    return thicken(CHEST, root / "crop_x3.nii.gz", 3, crop=(48, 48))


def planned(tmp_path, thick, name):
    work = tmp_path / name
    api.plan(write_dataset(tmp_path / f"{name}.json", [thick]), work, preset="tiny", memory_gb=2, seed=7)
    return work


def test_killed_training_resumes_and_ends_where_an_uninterrupted_run_ends(tmp_path, thick_crop):
    reference = planned(tmp_path, thick_crop, "uninterrupted")
    done = run_cli("train", "--work", str(reference), *overrides_args(TRAIN))
    assert done.returncode == 0, done.stderr[-2000:]

    work = planned(tmp_path, thick_crop, "interrupted")
    # kill -9 the whole training (icmd_auto and its monai.bundle child) right after the first checkpoint
    proc = subprocess.Popen(
        [sys.executable, "-m", "icmd_auto", "train", "--work", str(work), *overrides_args(TRAIN)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=str(REPO),
    )
    first = work / "bundle" / "models" / "checkpoint_1.pt"
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert first.exists(), "no checkpoint appeared"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (work / "bundle" / "models" / "checkpoint_4.pt").exists(), "killed before the end"

    resumed = run_cli("train", "--work", str(work), *overrides_args(TRAIN))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = resumed.stdout + resumed.stderr
    assert "resumed from checkpoint_" in log
    final = torch.load(work / "bundle" / "models" / "model.pt", weights_only=True)
    expected = torch.load(reference / "bundle" / "models" / "model.pt", weights_only=True)
    diff = max(float((final[k] - expected[k]).abs().max()) for k in expected)
    assert diff == 0.0, f"resumed run differs from the uninterrupted one by {diff}"


def test_same_seed_same_prediction_bytes(tmp_path, tiny_work, chest_x3):
    outs = []
    for i in range(2):
        out = tmp_path / f"pred_{i}.nii.gz"
        result = run_cli("predict", "--work", str(tiny_work), "--input", str(chest_x3), "--output", str(out))
        assert result.returncode == 0, result.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
