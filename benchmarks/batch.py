"""An overnight batch, measured: 100 scans cut from the shared CT, a few broken on purpose, then the
faults of a night injected (SIGKILL at seeded moments, a full disk, a second batch on the folder).

    python benchmarks/batch.py                 # 100 scans; writes docs/BATCH.md and docs/results_batch.json
    python benchmarks/batch.py --cases 20      # a quick look (docs not written)

1. Scans: crops of ../shared/data/ct's chest (1.5 mm) and abdomen (3 mm) CT, 10 shapes (32 x 32 to
   80 x 72 in-plane, 31 to 64 thin slices), each block of ten cases a shuffle of the ten shapes so
   that cases 1-10 hold the largest; thickened x3 (every third slice kept). Five are broken on
   purpose: a truncated gzip, a gzip of noise, a file without read permission (the batch runs
   without root's permission override, through setpriv, where this runs as root), a DICOM series
   with a slice missing (the shared 20-slice series), and one deleted after the batch has listed it.
2. A work folder with the shipped x3 prior (``zero_shot_work``: planned on the readable cases, no
   training); then the single-case figure: ``api.predict`` of one case of each shape, in this process
   (network load included, process start-up not; after one untimed run); then the batch, the command as a user
   runs it (``icmd_auto predict --work W --input scans --output out``): wall time, per-case seconds,
   resident memory after cases 10 and 100 and the peak up to them (the report's rows), the model
   loads, the failures. Throughput: the batch's wall time against the sum of the single-case
   seconds of its cases' shapes (the single-case figure x N).
3. Faults, on ten of the scans: SIGKILL from outside at three seeded times, each followed by
   ``--resume`` (every output checked whole and equal to the batch's after the last); the output
   folder a tmpfs too small for all outputs (where one can be mounted), then made larger and
   resumed; a second batch started while one runs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from icmd_auto import api  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import write_block  # noqa: E402

CT = REPO.parent / "shared" / "data" / "ct"
SOURCES = [CT / "totalseg_chest_1.5mm.nii.gz", CT / "totalseg_example_ct_3mm.nii.gz"]
DICOM_SERIES = CT / "totalseg_dicom_series"
FACTOR = 3
# (x, y, thin slices): outputs from 32 x 32 x 31 to 80 x 72 x 64 voxels (a whole run in about ten
# minutes on 2 cores)
SHAPES = [(32, 32, 31), (40, 32, 34), (40, 40, 37), (48, 40, 40), (48, 48, 43), (56, 48, 46),
          (64, 56, 52), (64, 64, 55), (72, 64, 58), (80, 72, 64)]  # fmt: skip
# case number (1-based) -> the fault planted there
BROKEN = {
    13: "truncated gzip",
    37: "corrupt file",
    52: "no read permission",
    68: "DICOM slice missing",
    85: "vanished",
}


def make_scans(
    folder: Path, count: int, rng: random.Random
) -> tuple[list[Path], dict[str, str], dict[str, tuple]]:
    """``count`` thick scans ``case_NNN`` in ``folder``; returns them in order, the broken ones
    (name -> fault), and each good case's shape."""
    folder.mkdir(parents=True)
    volumes = [(nib.load(str(s)), np.asanyarray(nib.load(str(s)).dataobj).astype(np.int16)) for s in SOURCES]
    order = []
    while len(order) < count:
        block = list(range(len(SHAPES)))
        rng.shuffle(block)
        order += block
    cases, broken, shapes = [], {}, {}
    for i in range(1, count + 1):
        name = f"case_{i:03d}"
        fault = BROKEN.get(i) if count >= 100 or i in (13, 37) else None
        if fault == "DICOM slice missing":
            series = folder / name
            shutil.copytree(DICOM_SERIES, series)
            files = sorted(
                series.iterdir(),
                key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber),
            )
            files[len(files) // 2].unlink()
            cases.append(series)
            broken[name] = fault
            continue
        x, y, z = SHAPES[order[i - 1]]
        image, data = volumes[i % 2]
        ox, oy = rng.randint(0, data.shape[0] - x), rng.randint(0, data.shape[1] - y)
        oz = rng.randint(0, data.shape[2] - z)
        crop = data[ox : ox + x, oy : oy + y, oz : oz + z : FACTOR]
        affine = image.affine.copy()
        affine[:3, 3] += affine[:3, :3] @ np.array([ox, oy, oz])
        affine[:3, 2] *= FACTOR
        path = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(crop, affine), str(path))
        cases.append(path)
        if fault == "truncated gzip":
            whole = path.read_bytes()
            path.write_bytes(whole[: len(whole) // 2])
        elif fault == "corrupt file":
            path.write_bytes(gzip.compress(os.urandom(20000)))
        elif fault == "no read permission":
            path.chmod(0)
        if fault:
            broken[name] = fault
        else:
            shapes[name] = (x, y, z)
    return cases, broken, shapes


def command(*args: str) -> list[str]:
    """``icmd_auto ARGS`` as a user runs it; as root, without the permission override (setpriv), so
    that a file without read permission is one for the batch too."""
    run = [sys.executable, "-m", "icmd_auto", *args]
    if os.geteuid() == 0 and shutil.which("setpriv"):
        caps = "-dac_override,-dac_read_search"
        run = ["setpriv", "--bounding-set", caps, "--inh-caps", caps, *run]
    return run


def run_batch(args: list[str], log: Path, **popen) -> tuple[subprocess.Popen, float]:
    with open(log, "w") as f:
        proc = subprocess.Popen(command(*args), stdout=f, stderr=subprocess.STDOUT, cwd=str(REPO), **popen)
    return proc, time.perf_counter()


def cases_of(report: Path) -> list[dict]:
    return json.loads(report.read_text())["cases"]


def whole_and_equal(output: Path, reference: Path | None) -> bool:
    try:
        with gzip.open(output) as f:
            while f.read(1 << 20):
                pass
        data = np.asanyarray(nib.load(str(output)).dataobj)
    except Exception:
        return False
    return reference is None or np.array_equal(data, np.asanyarray(nib.load(str(reference)).dataobj))


def single_case_seconds(work: Path, cases: list[Path], shapes: dict, scratch: Path) -> dict[tuple, float]:
    """``api.predict`` of one case of each shape on its own, in this process (after one untimed run:
    the first call in a process imports the bundle's code)."""
    seconds = {}
    for case in cases:
        shape = shapes.get(case.name.removesuffix(".nii.gz"))
        if shape is None or shape in seconds:
            continue
        if not seconds:
            api.predict(work, case, scratch / f"warm_up_{case.name}", quiet=True)
        start = time.perf_counter()
        api.predict(work, case, scratch / f"single_{case.name}", quiet=True)
        seconds[shape] = time.perf_counter() - start
    return seconds


def copies(scans: list[Path], folder: Path) -> Path:
    folder.mkdir()
    for scan in scans:
        shutil.copyfile(scan, folder / scan.name)
    return folder


def kills(
    work: Path, scans: list[Path], reference: Path, scratch: Path, rng: random.Random, budget: float
) -> list[dict]:
    """SIGKILL a batch of ten scans at three seeded times, --resume after each, then to the end."""
    folder = copies(scans, scratch / "kill_scans")
    out, rows = scratch / "kill_out", []
    for i in range(3):
        delay = round(rng.uniform(0.3, 1.0) * budget, 1)
        args = ["predict", "--work", str(work), "--input", str(folder), "--output", str(out), "--quiet"]
        proc, start = run_batch(
            args + (["--resume"] if i else []), scratch / f"kill_{i}.log", start_new_session=True
        )
        while proc.poll() is None and time.perf_counter() - start < delay:
            time.sleep(0.05)
        finished = proc.poll() is not None
        if not finished:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        finals = sorted(out.glob("*_icmd.nii.gz")) if out.exists() else []
        report = out / "predict_report.json"
        running = (
            [Path(c["input"]).name for c in cases_of(report) if c["status"] == "running"]
            if report.exists()
            else []
        )
        rows.append(
            {
                "killed_after_s": delay,
                "finished_before_the_kill": finished,
                "outputs_at_final_names": len(finals),
                "all_whole": all(whole_and_equal(f, reference / f.name) for f in finals),
                "case_in_progress": running[0] if running else None,
                "leftovers": sorted(p.name for p in out.iterdir() if p.name.startswith("."))
                if out.exists()
                else [],
            }
        )
    args = [
        "predict",
        "--work",
        str(work),
        "--input",
        str(folder),
        "--output",
        str(out),
        "--resume",
        "--quiet",
    ]
    proc, _ = run_batch(args, scratch / "kill_final.log")
    code = proc.wait()
    finals = sorted(out.glob("*_icmd.nii.gz"))
    rows.append(
        {
            "final_resume_exit": code,
            "outputs": len(finals),
            "all_whole_and_equal_to_the_uninterrupted_batch": all(
                whole_and_equal(f, reference / f.name) for f in finals
            ),
            "leftovers": sorted(p.name for p in out.iterdir() if p.name.startswith(".")),
        }
    )
    return rows


def disk_full(work: Path, scans: list[Path], scratch: Path) -> dict:
    folder = copies(scans, scratch / "full_scans")
    out = scratch / "full_out"
    out.mkdir()
    sizes = sorted(os.path.getsize(s) * 3 for s in scans)  # an output is about 3x its thick input
    size_kb = max(64, int(sum(sizes[: len(sizes) // 2]) / 1024))
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(out)], capture_output=True
    ).returncode:
        return {
            "outcome": "not run: no tmpfs can be mounted here (tests/test_batch.py simulates ENOSPC instead)"
        }
    try:
        args = ["predict", "--work", str(work), "--input", str(folder), "--output", str(out), "--quiet"]
        proc, _ = run_batch(args, scratch / "full.log")
        code = proc.wait()
        log = (scratch / "full.log").read_text()
        rows = cases_of(out / "predict_report.json")
        full = [r for r in rows if r["reason"].startswith("no space left on device")]
        written = [Path(r["output"]) for r in rows if r["status"] == "written"]
        result = {
            "tmpfs_kb": size_kb,
            "exit": code,
            "message": next((line for line in log.splitlines() if "no space left" in line), ""),
            "written_before": len(written),
            "written_whole": all(whole_and_equal(p, None) for p in written),
            "case_that_hit_the_full_disk": Path(full[0]["input"]).name if full else None,
            "not_started": sum(r["reason"].startswith("not started") for r in rows),
            "files_left": sorted(p.name for p in out.iterdir()),
        }
        subprocess.run(["mount", "-o", "remount,size=64m", str(out)], check=True)
        proc, _ = run_batch([*args, "--resume"], scratch / "full_resume.log")
        result["resume_exit"] = proc.wait()
        result["after_resume_all_whole"] = all(whole_and_equal(p, None) for p in out.glob("*_icmd.nii.gz"))
        result["after_resume_outputs"] = len(list(out.glob("*_icmd.nii.gz")))
        return result
    finally:
        subprocess.run(["umount", "-l", str(out)], capture_output=True)


def second_batch(work: Path, scans: list[Path], scratch: Path) -> dict:
    folder = copies(scans, scratch / "lock_scans")
    out = scratch / "lock_out"
    args = ["predict", "--work", str(work), "--input", str(folder), "--output", str(out), "--quiet"]
    first, _ = run_batch(args, scratch / "lock_first.log")
    while first.poll() is None and not (out / "predict_report.json").exists():
        time.sleep(0.05)
    # with --resume: outputs the first has written already do not refuse it; the lock must
    second = subprocess.run(command(*args, "--resume"), capture_output=True, text=True, cwd=str(REPO))
    code = first.wait()
    return {"first_exit": code, "second_exit": second.returncode, "second_said": second.stderr.strip()}


def guarded(fault, *args):
    """One fault's outcome, or how injecting it went wrong (the other figures are kept)."""
    try:
        return fault(*args)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument(
        "--scratch", type=Path, default=None, help="where scans and outputs go (default: a temp dir)"
    )
    args = parser.parse_args()
    rng = random.Random(args.seed)
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="icmd_batch_bench_")).absolute()
    scratch.mkdir(parents=True, exist_ok=True)
    started, load_before = time.perf_counter(), os.getloadavg()
    cases, broken, shapes = make_scans(scratch / "scans", args.cases, rng)
    work = api.zero_shot_work(scratch / "scans", scratch / "work", factor=FACTOR, quiet=True)
    single = single_case_seconds(work, cases, shapes, scratch)

    out = scratch / "out"
    vanishing = [c for c in cases if broken.get(c.name.removesuffix(".nii.gz")) == "vanished"]

    def delete_once_listed():  # the report is written once the batch has listed its cases
        while not (out / "predict_report.json").exists():
            time.sleep(0.02)
        for path in vanishing:
            path.unlink()

    watcher = threading.Thread(target=delete_once_listed, daemon=True)
    watcher.start()
    batch_args = ["predict", "--work", str(work), "--input", str(scratch / "scans"), "--output", str(out)]
    proc, start = run_batch(batch_args, scratch / "batch.log")
    code = proc.wait()
    wall = time.perf_counter() - start
    report = json.loads((out / "predict_report.json").read_text())
    rows = report["cases"]
    good = [r for r in rows if r["status"] == "written"]
    seconds = [r["seconds"] for r in good]
    expected = sum(single[shapes[Path(r["input"]).name.removesuffix(".nii.gz")]] for r in good)

    def at(k: int, key: str) -> float:
        return rows[min(k, len(rows)) - 1][key]

    def peak(k: int) -> float:
        return max(r["peak_memory_mb"] or 0 for r in rows[:k])

    faults = [
        {
            "case": name,
            "fault": fault,
            "status": next(r["status"] for r in rows if Path(r["input"]).name.startswith(name)),
            "reason": next(r["reason"] for r in rows if Path(r["input"]).name.startswith(name)),
        }
        for name, fault in broken.items()
    ]
    ten = [c for c in cases if c.name.removesuffix(".nii.gz") in shapes][:10]
    per_case_budget = statistics.mean(seconds) * len(ten) + 8.0
    night = {
        "sigkill": guarded(kills, work, ten, out, scratch, rng, per_case_budget),
        "disk_full": guarded(disk_full, work, ten, scratch),
        "second_batch": guarded(second_batch, work, ten, scratch),  # ten: longer than the second's start-up
    }
    results = {
        "command": "python benchmarks/batch.py" + (f" --cases {args.cases}" if args.cases != 100 else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "batch_command": "icmd_auto " + shlex.join(batch_args[:2]) + " W --input scans/ --output out/",
        "cases": len(rows),
        "exit": code,
        "wall_s": round(wall, 1),
        "written": len(good),
        "failed": sum(r["status"] == "failed" for r in rows),
        "per_case_s": {
            "mean": round(statistics.mean(seconds), 2),
            "median": round(statistics.median(seconds), 2),
            "min": min(seconds),
            "max": max(seconds),
            "first_10_mean": round(statistics.mean(r["seconds"] for r in good[:10]), 2),
            "last_10_mean": round(statistics.mean(r["seconds"] for r in good[-10:]), 2),
        },
        "rss_mb_after": {"case_10": at(10, "rss_mb"), f"case_{len(rows)}": at(len(rows), "rss_mb")},
        "peak_rss_mb_up_to": {"case_10": peak(10), f"case_{len(rows)}": peak(len(rows))},
        "model_loads": report["model_loads"],
        "single_case_s": {f"{x}x{y}x{z}": round(s, 2) for (x, y, z), s in sorted(single.items())},
        "single_case_x_n_s": round(expected, 1),
        "throughput_vs_single_x_n": round(expected / wall, 3),
        "faults_in_the_batch": faults,
        "faults_of_a_night": night,
        "total_s": round(time.perf_counter() - started, 1),
        # other work on the machine (the 1-minute load average; this benchmark alone adds about 1-2)
        "load_average_before_after": [round(load_before[0], 1), round(os.getloadavg()[0], 1)],
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.cases == 100:
        (REPO / "docs" / "results_batch.json").write_text(text + "\n")
        write_block(REPO / "docs" / "BATCH.md", "<!-- batch:begin -->", "<!-- batch:end -->", table(results))
    shutil.rmtree(scratch, ignore_errors=True) if args.scratch is None else None


def table(r: dict) -> str:
    rss, peak = list(r["rss_mb_after"].items()), list(r["peak_rss_mb_up_to"].items())
    pc = r["per_case_s"]
    lines = [
        f"`{r['command']}` on {r['machine']} (1-minute load average "
        f"{r['load_average_before_after'][0]} before, {r['load_average_before_after'][1]} after), "
        f"{r['total_s']:.0f} s in all.",
        "",
        "| batch of 100 scans | value |",
        "|---|---|",
        f"| cases written / failed (exit code) | {r['written']} / {r['failed']} ({r['exit']}) |",
        f"| wall time of the command | {r['wall_s']} s |",
        f"| per-case seconds: mean, median, min, max | {pc['mean']}, {pc['median']}, {pc['min']}, {pc['max']} |",
        f"| per-case seconds: first 10 written, last 10 written | {pc['first_10_mean']}, {pc['last_10_mean']} |",
        f"| RSS after {rss[0][0].replace('_', ' ')} / {rss[1][0].replace('_', ' ')} | {rss[0][1]} / {rss[1][1]} MB |",
        f"| peak RSS up to {peak[0][0].replace('_', ' ')} / {peak[1][0].replace('_', ' ')} | {peak[0][1]} / {peak[1][1]} MB |",
        f"| network loads | {r['model_loads']} |",
        f"| single-case figure x N (sum over the written cases) | {r['single_case_x_n_s']} s |",
        f"| throughput: single-case figure x N / batch wall time | {r['throughput_vs_single_x_n']} |",
        "",
        "Single-case seconds by shape (x, y, thin slices), network load included: "
        + ", ".join(f"{k} {v}" for k, v in r["single_case_s"].items())
        + ".",
        "",
        "| broken on purpose | status | reason in the report |",
        "|---|---|---|",
    ]
    lines += [
        f"| {f['case']}: {f['fault']} | {f['status']} | {f['reason']} |" for f in r["faults_in_the_batch"]
    ]
    night = r["faults_of_a_night"]
    lines += ["", "| fault of a night (ten of the scans) | outcome |", "|---|---|"]
    for name, outcome in list(night.items()):
        if isinstance(outcome, dict) and "error" in outcome:
            lines.append(f"| {name} | the injection failed: {outcome['error']} |")
            del night[name]
    if "sigkill" not in night:
        night["sigkill"] = [None]
    for row in [row for row in night["sigkill"][:-1] if row]:
        lines.append(
            f"| SIGKILL after {row['killed_after_s']} s | "
            + (
                "finished before the kill"
                if row["finished_before_the_kill"]
                else f"in {row['case_in_progress']}"
            )
            + f"; {row['outputs_at_final_names']} outputs at final names, all whole: {row['all_whole']}; "
            f"left: {', '.join(row['leftovers']) or 'nothing'} |"
        )
    last = night["sigkill"][-1]
    lines.append("| then `--resume` | not run |") if last is None else lines.append(
        f"| then `--resume` | exit {last['final_resume_exit']}, {last['outputs']} outputs, whole and equal to the "
        f"uninterrupted batch's: {last['all_whole_and_equal_to_the_uninterrupted_batch']}; left: "
        f"{', '.join(last['leftovers']) or 'nothing'} |"
    )
    full = night.get("disk_full", {"outcome": "see above"})
    if "exit" in full:
        lines.append(
            f"| disk full ({full['tmpfs_kb']} KB tmpfs as the output folder) | exit {full['exit']}: "
            f"{full['case_that_hit_the_full_disk']} failed, `{full['message']}`; {full['written_before']} written "
            f"before, whole: {full['written_whole']}; {full['not_started']} not started; files left: "
            f"{', '.join(full['files_left'])} |"
        )
        lines.append(
            f"| then 64 MB and `--resume` | exit {full['resume_exit']}, {full['after_resume_outputs']} outputs, all "
            f"whole: {full['after_resume_all_whole']} |"
        )
    else:
        lines.append(f"| disk full | {full['outcome']} |")
    second = night.get("second_batch")
    lines.append("| a second batch | see above |") if second is None else lines.append(
        f"| a second batch on the same folder (`--resume`) | exit {second['second_exit']}: `{second['second_said']}` "
        f"(the first: exit {second['first_exit']}"
        + (
            "; the first had ended before the second started: no overlap, the lock untested here)"
            if second["second_exit"] == 0
            else ")"
        )
        + " |"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
