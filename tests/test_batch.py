"""An overnight batch that loses nothing: one report per run, ``--resume`` of exactly the failed and
missing cases, a lock on the output folder, parts for a scheduler's array, and the faults of a night
(broken inputs, a SIGKILL at any moment, a full disk), each named in the report, with no partial file
where an output belongs.

The bundle is conftest's phantom_work (tiny, x3); the scans are small phantoms made here, so every
test but the DICOM case runs without ../shared.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import errno
import gzip
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import DICOM_SERIES, REPO, run_main

from icmd_auto import batch, predict, runner
from icmd_auto.synthetic import ct_phantom, save_nifti

SPACING = (1.0, 1.0, 3.0)
REPORT, CSV = "predict_report.json", "predict_report.csv"


def scans(folder: Path, shapes: dict[str, tuple[int, int, int]]) -> Path:
    """Thick phantom scans ``<name>.nii.gz`` of the given shapes (x, y, slices) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, shape in shapes.items():
        save_nifti(ct_phantom(shape, SPACING), SPACING, str(folder / f"{name}.nii.gz"))
    return folder


def cases_of(folder: Path, name: str = REPORT) -> dict[str, dict]:
    """The report's rows by case name (the input's name without .nii.gz)."""
    cases = json.loads((folder / name).read_text())["cases"]
    return {Path(c["input"]).name.removesuffix(".nii.gz"): c for c in cases}


def statuses(folder: Path, name: str = REPORT) -> dict[str, str]:
    return {case: row["status"] for case, row in cases_of(folder, name).items()}


def whole(output: Path, scan: Path) -> bool:
    """The output decodes to its end (gzip's CRC checked) and carries the input's slices unchanged."""
    with gzip.open(output) as f:
        while f.read(1 << 20):
            pass
    thin, thick = np.asanyarray(nib.load(str(output)).dataobj), np.asanyarray(nib.load(str(scan)).dataobj)
    return thin.shape[2] == (thick.shape[2] - 1) * 3 + 1 and np.array_equal(thin[:, :, ::3], thick)


def batch_args(work: Path, source: Path, out: Path, *more: str) -> list[str]:
    return ["predict", "--work", str(work), "--input", str(source), "--output", str(out), *more]


@contextlib.contextmanager
def file_permissions_enforced():
    """As root the kernel reads any file whatever its mode (CAP_DAC_OVERRIDE): this thread drops that
    capability from its effective set for the block (and takes it back after), so an unreadable file
    is unreadable here as it is for any other user."""
    if os.geteuid() != 0:
        yield
        return

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [
            ("effective", ctypes.c_uint32),
            ("permitted", ctypes.c_uint32),
            ("inheritable", ctypes.c_uint32),
        ]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
        pytest.skip("capabilities cannot be read here")
    saved = data[0].effective
    data[0].effective &= ~((1 << 1) | (1 << 2))  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.capset(ctypes.byref(header), data) != 0:
        pytest.skip("capabilities cannot be dropped here")
    try:
        yield
    finally:
        data[0].effective = saved
        libc.capset(ctypes.byref(header), data)


def test_broken_inputs_are_named_in_the_report_and_resume_does_exactly_them(
    phantom_work, tmp_path, capfd, monkeypatch
):
    source = scans(tmp_path / "scans", {"a": (32, 32, 12), "b": (40, 36, 10), "unreadable": (32, 32, 8)})
    (source / "corrupt.nii.gz").write_bytes(gzip.compress(os.urandom(4000)))  # gzip of noise: no NIfTI inside
    whole_file = (source / "a.nii.gz").read_bytes()
    (source / "truncated.nii.gz").write_bytes(whole_file[: len(whole_file) // 2])
    shutil.copyfile(source / "b.nii.gz", source / "vanishing.nii.gz")
    (source / "unreadable.nii.gz").chmod(0)
    named = {
        "corrupt": "cannot be read as a NIfTI",
        "truncated": "Compressed file ended before the end-of-stream marker was reached",
        "unreadable": "Permission denied",
        "vanishing": "gone: it was listed when the batch started, and is no longer there",
    }
    if DICOM_SERIES.exists():  # the real 20-slice series with instance 276 removed
        dicom = source / "dicom_missing_slice"
        shutil.copytree(DICOM_SERIES, dicom)
        by_instance = sorted(
            dicom.iterdir(), key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber)
        )
        by_instance[9].unlink()
        named["dicom_missing_slice"] = "missing slice(s): 4 mm between instances 275 and 277"

    listed = predict._batch_jobs

    def listed_then_deleted(*args, **kwargs):  # the input goes after the listing, before its reading
        jobs = listed(*args, **kwargs)
        (source / "vanishing.nii.gz").unlink()
        return jobs

    monkeypatch.setattr(predict, "_batch_jobs", listed_then_deleted)
    out = tmp_path / "thin"
    with file_permissions_enforced():
        first = run_main(capfd, *batch_args(phantom_work, source, out))
    monkeypatch.undo()

    failed = len(named)
    assert first.returncode == 1
    assert (
        f"icmd_auto: error: {failed} of {failed + 2} case(s) failed (2 written, 0 skipped as done); report: {out / REPORT}"
        in first.stderr
    )
    rows = cases_of(out)
    assert {case: row["status"] for case, row in rows.items()} == {"a": "written", "b": "written"} | {
        case: "failed" for case in named
    }
    for case, reason in named.items():
        assert reason in rows[case]["reason"], (case, rows[case]["reason"])
        assert "\n" not in rows[case]["reason"]
    for case in ("a", "b"):
        assert rows[case]["seconds"] > 0 and rows[case]["peak_memory_mb"] > 0 and rows[case]["rss_mb"] > 0
        assert whole(out / f"{case}_icmd.nii.gz", source / f"{case}.nii.gz")
    with open(out / CSV, newline="") as f:
        table = {Path(r["input"]).name.removesuffix(".nii.gz"): r for r in csv.DictReader(f)}
    assert {case: r["status"] for case, r in table.items()} == statuses(out)
    assert json.loads((out / REPORT).read_text())["model_loads"] == 1, "the network is loaded once per batch"
    assert sorted(p.name for p in out.iterdir()) == sorted(["a_icmd.nii.gz", "b_icmd.nii.gz", REPORT, CSV]), (
        "nothing partial, no temporary file, no lock left"
    )

    # two inputs mended, one new: --resume does these three and the ones still broken, and nothing else
    (source / "unreadable.nii.gz").chmod(0o644)
    shutil.copyfile(source / "a.nii.gz", source / "truncated.nii.gz")
    scans(source, {"new": (36, 32, 9)})
    done = {case: (out / f"{case}_icmd.nii.gz").stat().st_mtime_ns for case in ("a", "b")}
    resumed = run_main(capfd, *batch_args(phantom_work, source, out, "--resume"))
    assert resumed.returncode == 1
    rows = cases_of(out)
    still_broken = {case for case in named if case not in ("unreadable", "truncated", "vanishing")}
    assert {case: row["status"] for case, row in rows.items()} == (
        {"a": "skipped", "b": "skipped", "unreadable": "written", "truncated": "written", "new": "written"}
        | {case: "failed" for case in still_broken}
    )
    assert rows["truncated"]["previous"].startswith("failed: cannot be read as a NIfTI")
    assert rows["a"]["previous"] == "written" and rows["new"]["previous"] is None
    assert {case: (out / f"{case}_icmd.nii.gz").stat().st_mtime_ns for case in ("a", "b")} == done
    for case in ("unreadable", "truncated", "new"):
        assert whole(out / f"{case}_icmd.nii.gz", source / f"{case}.nii.gz")


# The moments of a SIGKILL: the case checked, its network not run / the output's bytes partly written
# in the scratch folder / the output written, not yet renamed / renamed, the report not yet updated.
MOMENTS = ("before", "during", "after_write", "after_commit")
KILLED_RUN = r"""
import os, signal, sys
from pathlib import Path
from icmd_auto import cli, predict, runner

moment, case, fraction, args = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
calls = []

def at_case():  # the case-th call of the hooked step in this run
    calls.append(1)
    return len(calls) == case

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if moment == "before":
    run = runner.InferenceSession.run
    def hooked(self, *a, **k):
        if at_case():
            die()
        return run(self, *a, **k)
    runner.InferenceSession.run = hooked
elif moment == "during":
    io = sys.modules[runner.bundle_scripts(Path(args[args.index("--work") + 1]) / "bundle") + ".io"]
    open_gzip = io.open_gzip
    class Dying:  # writes a fraction of the first block it is given, flushes it to the file, dies
        def __init__(self, stream):
            self.stream = stream
        def write(self, data):
            data = memoryview(data).cast("B")
            self.stream.write(data[: max(1, int(len(data) * fraction))])
            self.stream.flush()
            die()
        def __getattr__(self, name):
            return getattr(self.stream, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.stream.close()
    io.open_gzip = lambda path, threads=None: Dying(open_gzip(path, threads)) if at_case() else open_gzip(path, threads)
else:
    commit = predict._commit
    def hooked(result, output, scratch):
        if moment == "after_write" and at_case():
            assert result.stat().st_size > 0
            die()
        commit(result, output, scratch)
        if moment == "after_commit" and at_case():
            die()
    predict._commit = hooked
sys.exit(cli.main(args))
"""


def test_killed_at_seeded_moments_then_resumed_every_output_is_whole(phantom_work, tmp_path, capfd):
    shapes = {f"s{i}": (32 + 4 * (i % 3), 32 + 2 * (i % 2), 8 + i % 4) for i in range(8)}
    source = scans(tmp_path / "scans", shapes)
    reference = tmp_path / "reference"
    assert run_main(capfd, *batch_args(phantom_work, source, reference)).returncode == 0
    expected = {p.name: np.asanyarray(nib.load(str(p)).dataobj) for p in reference.glob("*_icmd.nii.gz")}
    assert len(expected) == 8

    out, rng = tmp_path / "thin", random.Random(23)
    for i, moment in enumerate(MOMENTS):
        case, fraction = rng.choice([1, 2]), round(rng.uniform(0.05, 0.95), 2)
        args = batch_args(phantom_work, source, out, *(["--resume"] if i else []), "--quiet")
        killed = subprocess.run(
            [sys.executable, "-c", KILLED_RUN, moment, str(case), str(fraction), *args],
            capture_output=True,
            text=True,
            cwd=str(REPO),
            timeout=600,
        )
        assert killed.returncode == -signal.SIGKILL, (moment, killed.stderr[-3000:])
        finals = sorted(out.glob("*_icmd.nii.gz"))
        for output in finals:  # whatever the moment, a final name holds a whole output
            assert np.array_equal(np.asanyarray(nib.load(str(output)).dataobj), expected[output.name]), moment
        running = [c for c, s in statuses(out).items() if s == "running"]
        assert len(running) == 1, (moment, statuses(out))  # the report says which case the run was in
        committed = (out / f"{running[0]}_icmd.nii.gz").exists()
        assert committed == (moment == "after_commit"), moment

    resumed = run_main(capfd, *batch_args(phantom_work, source, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted([*expected, REPORT, CSV]), (
        "no scratch, temporary or lock left"
    )
    for name, data in expected.items():
        assert whole(out / name, source / name.replace("_icmd", ""))
        assert np.array_equal(np.asanyarray(nib.load(str(out / name)).dataobj), data)
    assert set(statuses(out).values()) <= {"written", "skipped"}
    # the last run's report said which case it was in: the resume says it redid (or found) that one
    assert cases_of(out)[running[0]]["previous"].startswith("failed: interrupted: the run (pid ")


def tmpfs(path: Path, kilobytes: int) -> bool:
    path.mkdir()
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={kilobytes}k", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


@pytest.mark.parametrize("disk", ["tmpfs", "simulated"])
def test_a_full_disk_stops_the_batch_cleanly_and_resume_finishes_it(
    phantom_work, tmp_path, capfd, monkeypatch, disk
):
    """``tmpfs``: the output folder is a 192 KB tmpfs (where this user may mount one); ``simulated``:
    the bundle's gzip stream raises ENOSPC after a few bytes of the third output, as a full disk does."""
    source = scans(
        tmp_path / "scans", {"a": (32, 32, 10), "b": (32, 32, 10), "c_large": (96, 96, 24), "d": (32, 32, 10)}
    )
    out = tmp_path / "thin"
    if disk == "tmpfs":
        if not tmpfs(out, 192):
            pytest.skip("no tmpfs can be mounted here (the simulated case covers a full disk)")
        request_cleanup = lambda: subprocess.run(["umount", "-l", str(out)], capture_output=True)  # noqa: E731
    else:
        io = sys.modules[runner.bundle_scripts(phantom_work / "bundle") + ".io"]
        open_gzip = io.open_gzip

        class Full:
            def __init__(self, stream):
                self.stream, self.written = stream, 0

            def write(self, data):
                self.written += len(memoryview(data).cast("B"))
                if self.written > 4096:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return self.stream.write(data)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.stream.close()

        monkeypatch.setattr(
            io,
            "open_gzip",
            lambda path, threads=None: (
                Full(open_gzip(path, threads)) if "c_large" in str(path) else open_gzip(path, threads)
            ),
        )
        request_cleanup = monkeypatch.undo
    try:
        full = run_main(capfd, *batch_args(phantom_work, source, out))
        assert full.returncode == 1
        assert "c_large.nii.gz: no space left on device for" in full.stderr, full.stderr
        rows = cases_of(out)
        assert statuses(out) == {"a": "written", "b": "written", "c_large": "failed", "d": "failed"}
        assert rows["c_large"]["reason"].startswith(
            f"no space left on device for {out / 'c_large_icmd.nii.gz'}"
        )
        assert rows["d"]["reason"] == "not started: the batch stopped when the disk was full"
        assert sorted(p.name for p in out.iterdir()) == sorted(
            ["a_icmd.nii.gz", "b_icmd.nii.gz", REPORT, CSV]
        ), "the partial file removed"
        for case in ("a", "b"):
            assert whole(out / f"{case}_icmd.nii.gz", source / f"{case}.nii.gz")
        if disk == "tmpfs":  # space freed
            subprocess.run(["mount", "-o", "remount,size=16m", str(out)], check=True)
        else:
            monkeypatch.undo()
        resumed = run_main(capfd, *batch_args(phantom_work, source, out, "--resume"))
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert statuses(out) == {"a": "skipped", "b": "skipped", "c_large": "written", "d": "written"}
        for case in ("c_large", "d"):
            assert whole(out / f"{case}_icmd.nii.gz", source / f"{case}.nii.gz")
    finally:
        request_cleanup()


HOLDER = """
import sys, time
from pathlib import Path
from icmd_auto.batch import OutputLock
OutputLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(300)
"""


def test_a_second_batch_refuses_while_the_first_holds_the_folder_and_takes_it_when_it_is_gone(
    phantom_work, tmp_path, capfd
):
    source = scans(tmp_path / "scans", {"a": (32, 32, 8)})
    out = tmp_path / "thin"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, cwd=str(REPO)
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        second = run_main(capfd, *batch_args(phantom_work, source, out))
        part = run_main(capfd, *batch_args(phantom_work, source, out, "--num_parts", "2", "--part_id", "1"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    for refused in (second, part):
        assert refused.returncode == 1
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1, refused.stderr
        assert lines[0].startswith(
            f"icmd_auto: error: {out}: another batch is writing here (pid {holder.pid} on "
        )
    assert sorted(p.name for p in out.iterdir()) == [".icmd_predict.lock"], (
        "the refused batches wrote nothing"
    )

    taken = run_main(capfd, *batch_args(phantom_work, source, out))  # the holder was killed: its lock is free
    assert taken.returncode == 0, taken.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(["a_icmd.nii.gz", REPORT, CSV])


def test_parts_of_a_split_batch_run_side_by_side_but_not_beside_a_whole_batch(tmp_path):
    out = tmp_path / "thin"
    out.mkdir()
    zero = batch.OutputLock(out, batch.Part(0, 2)).acquire()
    one = batch.OutputLock(out, batch.Part(1, 2)).acquire()
    with pytest.raises(batch.ICMDError, match=r"part 0 of 2 \(ids 0..1\) is running already \(pid \d+ on "):
        batch.OutputLock(out, batch.Part(0, 2)).acquire()
    with pytest.raises(batch.ICMDError, match=r"2 part\(s\) of a split batch is writing here \(pid \d+ on "):
        batch.OutputLock(out).acquire()
    zero.release()
    one.release()
    with batch.OutputLock(out):
        pass
    assert list(out.iterdir()) == []


def test_parts_split_deterministically_report_merges_them_and_resume_honours_them(
    phantom_work, tmp_path, capfd
):
    source = scans(tmp_path / "scans", {f"c{i}": (32, 32, 8 + i) for i in range(5)})
    (source / "c3.nii.gz").write_bytes(b"not a scan")
    out = tmp_path / "thin"
    parts = [
        run_main(capfd, *batch_args(phantom_work, source, out, "--num_parts", "2", "--part_id", str(i)))
        for i in (1, 0)
    ]
    assert [p.returncode for p in parts] == [1, 0]  # c3 is part 1's
    assert statuses(out, "predict_report.part0of2.json") == {
        "c0": "written",
        "c2": "written",
        "c4": "written",
    }
    assert statuses(out, "predict_report.part1of2.json") == {"c1": "written", "c3": "failed"}
    assert (out / "predict_report.part1of2.csv").exists() and not (out / REPORT).exists()

    merged = run_main(capfd, "report", str(out))
    assert merged.returncode == 1 and "1 case(s) failed" in merged.stderr
    assert merged.stdout.strip().startswith(
        "5 case(s) from predict_report.part0of2.json, predict_report.part1of2.json: 4 written, 0 skipped, 1 failed"
    )
    assert statuses(out) == {
        "c0": "written",
        "c1": "written",
        "c2": "written",
        "c3": "failed",
        "c4": "written",
    }

    shutil.copyfile(source / "c1.nii.gz", source / "c3.nii.gz")
    resumed = run_main(capfd, *batch_args(phantom_work, source, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    rows = cases_of(out)
    assert statuses(out) == {
        "c0": "skipped",
        "c1": "skipped",
        "c2": "skipped",
        "c3": "written",
        "c4": "skipped",
    }
    assert rows["c3"]["previous"].startswith("failed: cannot be read as a NIfTI")
    assert rows["c0"]["previous"] == "written"
    assert run_main(capfd, "report", str(out)).returncode == 0

    lone = tmp_path / "lone"  # one part of three ran: the report names the two that never did
    assert (
        run_main(
            capfd, *batch_args(phantom_work, source, lone, "--num_parts", "3", "--part_id", "1")
        ).returncode
        == 0
    )
    missing = run_main(capfd, "report", str(lone))
    assert (
        missing.returncode == 1
        and "no report from part 0 of 3, part 2 of 3 (its cases never ran)" in missing.stderr
    )


def test_progress_plain_lines_off_a_terminal_and_quiet_silences_them(phantom_work, tmp_path, capfd):
    source = scans(tmp_path / "scans", {"a": (32, 32, 8), "b": (32, 32, 9)})
    shown = run_main(capfd, *batch_args(phantom_work, source, tmp_path / "shown"))
    assert shown.returncode == 0, shown.stderr
    lines = [line for line in shown.stderr.splitlines() if line.startswith("[")]
    assert re.fullmatch(r"\[1/2\] a\.nii\.gz: written in \d+\.\d s, peak \d+ MB; ETA \d+:\d\d", lines[0]), (
        lines
    )
    assert re.fullmatch(r"\[2/2\] b\.nii\.gz: written in \d+\.\d s, peak \d+ MB", lines[1]), lines
    assert "%|" not in shown.stderr
    quiet = run_main(capfd, *batch_args(phantom_work, source, tmp_path / "quiet", "--quiet"))
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_progress_bar_over_cases_with_eta_on_a_terminal(phantom_work, tmp_path):
    from test_reliability import _on_a_terminal

    source = scans(tmp_path / "scans", {"a": (32, 32, 8), "b": (32, 32, 9)})
    shown = _on_a_terminal(*batch_args(phantom_work, source, tmp_path / "thin"))
    assert re.search(r"cases: 100%\|.*\| 2/2 \[\d\d:\d\d<\d\d:\d\d", shown), shown[-2000:]
    assert "synthesis" in shown, "a case's plane chunks have their own bar"


def test_parts_are_checked(phantom_work, tmp_path, capfd):
    source = scans(tmp_path / "scans", {"a": (32, 32, 8)})
    bad = run_main(
        capfd, *batch_args(phantom_work, source, tmp_path / "o", "--num_parts", "2", "--part_id", "2")
    )
    assert bad.returncode == 1 and "the part id is 0 .. num_parts - 1" in bad.stderr
    one = run_main(
        capfd,
        *batch_args(
            phantom_work, source / "a.nii.gz", tmp_path / "a.nii.gz", "--num_parts", "2", "--part_id", "0"
        ),
    )
    assert one.returncode == 1 and "is one volume; parts split a batch" in one.stderr
