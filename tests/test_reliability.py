"""Overnight runs: a killed training resumes where it stopped; predictions repeat bit-for-bit; batch
prediction goes past a failing case and resumes; previews; progress only where someone watches."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CHEST, REPO, TINY_TRAIN, run_cli, run_main, thicken, write_dataset

from icmd_auto import api
from icmd_auto.errors import ICMDError

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
    api.plan(
        write_dataset(tmp_path / f"{name}.json", [thick]),
        work,
        preset="tiny",
        memory_gb=2,
        seed=7,
        recipe="icmd",
    )
    return work


def test_killed_training_resumes_and_ends_where_an_uninterrupted_run_ends(tmp_path, thick_crop):
    reference = planned(tmp_path, thick_crop, "uninterrupted")
    done = run_cli("train", "--work", str(reference), *overrides_args(TRAIN))
    assert done.returncode == 0, done.stderr[-2000:]

    work = planned(tmp_path, thick_crop, "interrupted")
    # a test flag given as the bundle's own `run` override: one more expression, just before the one
    # that starts the trainer (everything is built in the same order as in the uninterrupted run),
    # makes the run mark and block at the start of epoch 2, after epoch 1's handlers wrote
    # checkpoint_1 and before checkpoint_2 could prune it: the kill below lands there every time
    paused = tmp_path / "paused_after_checkpoint_1"
    run = json.loads((work / "bundle" / "configs" / "train.json").read_text())["run"]
    assert run[-1] == "$@train#trainer.run()", run[-1]
    hold = (  # no word "import" in it: MONAI would parse the expression as an import statement
        "$@train#trainer.add_event_handler(ignite.engine.Events.EPOCH_STARTED(once=2), "
        f"lambda engine: [open({str(paused)!r}, 'w').close(), sys.modules['time'].sleep(600)])"
    )
    log = tmp_path / "interrupted.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "icmd_auto", "train", "--work", str(work), *overrides_args(TRAIN)]
            + ["--run", repr([*run[:-1], hold, run[-1]])],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(REPO),
        )
    deadline = time.time() + 300
    while not paused.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # the mark stays and the run is blocked: nothing to race
    held = paused.exists()
    with contextlib.suppress(ProcessLookupError):  # kill -9 icmd_auto and its monai.bundle child
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert held, f"the run did not reach epoch 2:\n{log.read_text()[-3000:]}"
    checkpoints = sorted(p.name for p in (work / "bundle" / "models").glob("checkpoint_*.pt"))
    assert checkpoints == ["checkpoint_1.pt"], checkpoints

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


def _known_slices_match(thin_path, thick_path, factor: int = 3) -> bool:
    thin, thick = nib.load(str(thin_path)), nib.load(str(thick_path))
    return thin.shape[2] == (thick.shape[2] - 1) * factor + 1 and np.array_equal(
        np.asanyarray(thin.dataobj)[:, :, ::factor], np.asanyarray(thick.dataobj)
    )


@pytest.fixture()
def scans(tmp_path):
    """A folder of thick scans: two small crops of the chest and one file cut in half."""
    folder = tmp_path / "scans"
    folder.mkdir()
    thicken(CHEST, folder / "a.nii.gz", 3, crop=(48, 48))
    thicken(CHEST, folder / "b.nii.gz", 3, crop=(40, 56))
    whole = (folder / "a.nii.gz").read_bytes()
    (folder / "c.nii.gz").write_bytes(whole[: len(whole) // 2])
    (folder / "notes.txt").write_text("not a scan: ignored")
    return folder


def test_batch_predict_goes_past_a_failure_and_resumes(tiny_work, scans, tmp_path, capfd):
    out = tmp_path / "thin"
    args = ["predict", "--work", str(tiny_work), "--input", str(scans), "--output", str(out)]
    first = run_main(capfd, *args)
    assert first.returncode == 1
    report = first.stderr.strip().splitlines()
    assert report[-2].startswith("icmd_auto: error: 1 of 3 case(s) failed (2 written, 0 skipped as done)")
    assert (
        report[-1]
        == f"  - {scans / 'c.nii.gz'}: cannot be read as a NIfTI (Compressed file ended before the end-of-stream marker was reached)"
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "a_icmd.nii.gz",
        "b_icmd.nii.gz",
        "predict_report.csv",
        "predict_report.json",
    ], "no partial or temporary files"
    for case in ("a", "b"):  # one network, case after case: each output is its own input's
        assert _known_slices_match(out / f"{case}_icmd.nii.gz", scans / f"{case}.nii.gz")
    assert "%|" not in first.stderr, "no progress bar when stderr is not a terminal"

    done = (out / "a_icmd.nii.gz").stat().st_mtime_ns
    again = run_main(capfd, *args)
    assert again.returncode == 1 and again.stderr.strip() == (
        f"icmd_auto: error: {out / 'a_icmd.nii.gz'}: exists (and 1 more); pass --resume to skip the cases "
        "already done or --overwrite to replace them"
    )

    shutil.copyfile(scans / "a.nii.gz", scans / "c.nii.gz")  # the broken scan replaced
    resumed = run_main(capfd, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip().endswith(
        f"wrote 1 case(s) into {out}; skipped 2 already done; report: {out / 'predict_report.json'}"
    )
    assert (out / "a_icmd.nii.gz").stat().st_mtime_ns == done, "finished cases are not redone"
    assert _known_slices_match(out / "c_icmd.nii.gz", scans / "c.nii.gz")


def test_batch_predict_from_a_dataset_json_with_previews(tiny_work, scans, tmp_path, capfd):
    dataset = write_dataset(tmp_path / "dataset.json", [scans / "a.nii.gz", scans / "b.nii.gz"])
    out = tmp_path / "thin"
    result = run_main(
        capfd, "predict", "--work", str(tiny_work), "--input", str(dataset), "--output", str(out), "--preview"
    )
    assert result.returncode == 0, result.stderr
    names = [
        "a_icmd.nii.gz",
        "a_icmd.png",
        "b_icmd.nii.gz",
        "b_icmd.png",
        "predict_report.csv",
        "predict_report.json",
    ]
    assert sorted(p.name for p in out.iterdir()) == names
    with pytest.raises(ICMDError, match="pass one of the two"):
        api.predict(tiny_work, dataset, out, overwrite=True, resume=True)


def test_preview_shows_input_beside_output(tiny_work, chest_x3, tmp_path, capfd):
    from PIL import Image

    from icmd_auto.preview import BAND, GAP

    out, png = tmp_path / "chest_thin.nii.gz", tmp_path / "views" / "chest.png"
    args = ["--work", str(tiny_work), "--input", str(chest_x3), "--output", str(out), "--preview", str(png)]
    result = run_main(capfd, "predict", *args)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in png.parent.iterdir()) == ["chest.png"], (
        "written atomically, nothing else left"
    )
    image = np.asarray(Image.open(png))
    # 122 x 102 in-plane at 1.5 mm, (38 - 1) * 3 + 1 = 112 output slices at 1.5 mm: square pixels, no resampling
    half = 122 + 102 + 2 * GAP
    assert image.shape == (BAND + 112, 2 * half)
    before, after = image[BAND:, :half].astype(int), image[BAND:, half:].astype(int)
    # superior up: row i is output slice 111 - i; every 3rd output slice is an input slice, copied unchanged
    known = [i for i in range(112) if (111 - i) % 3 == 0]
    synthesized = [i for i in range(112) if (111 - i) % 3]
    assert np.array_equal(before[known], after[known])
    assert np.abs(before[synthesized] - after[synthesized]).mean() > 1.0, "the synthesis shows"


def _on_a_terminal(*args: str) -> str:
    """The command with its stderr on a pseudo-terminal (an interactive shell); what it printed there."""
    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 24 x 120 characters
    proc = subprocess.Popen(
        [sys.executable, "-m", "icmd_auto", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=terminal,
        cwd=str(REPO),
    )
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the command closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(timeout=600)
    os.close(main)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_with_eta_on_a_terminal_and_quiet_silences_it(tiny_work, chest_x3, tmp_path):
    args = ["predict", "--work", str(tiny_work), "--input", str(chest_x3)]
    shown = _on_a_terminal(*args, "--output", str(tmp_path / "a.nii.gz"))
    assert re.search(r"100%\|.*\| \d+/\d+ \[\d\d:\d\d<\d\d:\d\d", shown), shown[-2000:]  # elapsed<ETA
    quiet = _on_a_terminal(*args, "--output", str(tmp_path / "b.nii.gz"), "--quiet")
    assert "%|" not in quiet and "INFO" not in quiet, quiet[-2000:]
