"""Peak memory and wall time of `icmd_auto predict` on a large CT volume (DESIGN 6, issue 6).

    python benchmarks/large_volume.py --slices 300 --memory_gb 5   # 512 x 512 x 300 at x4
    python benchmarks/large_volume.py --slices 100                 # 512 x 512 x 100 at x4, default budget

Steps, each an `icmd_auto` command (printed as it runs):
  1. a 512 x 512 x S int16 phantom at 0.7 x 0.7 x 2.8 mm (icmd_auto/synthetic.py, built in pieces
     so that making it does not need more memory than predicting it);
  2. `icmd_auto plan --preset small --epochs 1` (--preset; small is the default CPU preset; the sliding window and
     plane chunk come from --memory_gb, or from the default budget when it is not given);
  3. `icmd_auto train --epochs 1 --iterations_per_epoch 1` (the weights change neither memory nor time);
  4. `/usr/bin/time -v icmd_auto predict ...`, its stderr on a pseudo-terminal so the progress bar
     (windows done, elapsed < ETA) shows as a user sees it.
Prints the result and writes its row into the table of docs/PERFORMANCE.md (--out).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import nibabel as nib  # noqa: E402

from icmd_auto.dataset import write_dataset_json  # noqa: E402
from icmd_auto.synthetic import ct_phantom_large, save_nifti  # noqa: E402

SPACING = (0.7, 0.7, 2.8)  # thick 2.8 mm slices -> factor 4 -> 0.7 mm, isotropic
TABLE_BEGIN, TABLE_END = "<!-- large_volume:begin -->", "<!-- large_volume:end -->"
HEADER = (
    "| volume (thick) | output | --memory_gb | window x plane chunk | peak RSS | wall | output voxels/s | "
    "progress bar at the end (windows, elapsed<ETA) | load average |\n|---|---|---|---|---|---|---|---|---|"
)


def icmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "icmd_auto", *args]


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd[2:] if cmd[:3] == [sys.executable, "-m", "icmd_auto"] else cmd), flush=True)
    subprocess.run(cmd, check=True)


def on_a_terminal(cmd: list[str]) -> str:
    """Run ``cmd`` with stderr on a 24 x 120 pseudo-terminal; returns what it printed there."""
    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=terminal)
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
    proc.wait()
    os.close(main)
    if proc.returncode:
        raise SystemExit(f"predict failed with exit code {proc.returncode}")
    return b"".join(chunks).decode(errors="replace")


def time_report(path: Path) -> dict:
    text = path.read_text()
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text).group(1)
    seconds = sum(float(p) * 60**i for i, p in enumerate(reversed(clock.split(":"))))
    return {"peak_rss_gib": rss_kb / 2**20, "wall_s": seconds}


def write_row(out: Path, key: str, row: str) -> None:
    """Put ``row`` (replacing the one for the same volume) into the table between the markers."""
    text = out.read_text() if out.exists() else ""
    if TABLE_BEGIN not in text:
        text += f"\n{TABLE_BEGIN}\n{HEADER}\n{TABLE_END}\n"
    head, rest = text.split(TABLE_BEGIN, 1)
    table, tail = rest.split(TABLE_END, 1)
    rows = [r for r in table.strip().splitlines()[2:] if not r.startswith(f"| {key} ")]
    rows = sorted(rows + [row])
    out.write_text(f"{head}{TABLE_BEGIN}\n{HEADER}\n" + "\n".join(rows) + f"\n{TABLE_END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument(
        "--memory_gb", type=float, default=None, help="the plan's budget (default: the planner's)"
    )
    parser.add_argument(
        "--preset", default="small", help="small: the default CPU preset; tiny: a quick trial"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/icmd_large_volume"))
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "PERFORMANCE.md")
    args = parser.parse_args()

    shape = (512, 512, args.slices)
    root = args.work / f"512x512x{args.slices}_{args.preset}"
    root.mkdir(parents=True, exist_ok=True)
    volume = root / f"ct_512x512x{args.slices}.nii.gz"
    if not volume.exists():
        print(f"making {volume} ...", flush=True)
        save_nifti(ct_phantom_large(shape, SPACING), SPACING, str(volume))
    dataset = write_dataset_json(root / "dataset.json", [str(volume)], name=f"large_{args.slices}")
    work = root / "work"
    budget = ["--memory_gb", f"{args.memory_gb:g}"] if args.memory_gb else []
    run(
        icmd(
            "plan",
            "--dataset",
            str(dataset),
            "--work",
            str(work),
            "--preset",
            args.preset,
            "--epochs",
            "1",
            *budget,
        )
    )
    run(icmd("train", "--work", str(work), "--epochs", "1", "--iterations_per_epoch", "1", "--quiet"))

    output, report = root / "thin.nii.gz", root / "time.txt"
    predict = ["/usr/bin/time", "-v", "-o", str(report)]
    predict += icmd(
        "predict", "--work", str(work), "--input", str(volume), "--output", str(output), "--overwrite"
    )
    print("$", " ".join(predict[:4]), "icmd_auto", " ".join(predict[7:]), flush=True)
    load_before = os.getloadavg()[0]
    shown = on_a_terminal(predict)
    load_after = os.getloadavg()[0]
    measured = time_report(report)

    plans = json.loads((work / "plans.json").read_text())
    window = plans["sliding_window"]["value"]
    out_shape = nib.load(str(output)).shape
    assert out_shape == (512, 512, (args.slices - 1) * 4 + 1), out_shape
    voxels = int(out_shape[0]) * int(out_shape[1]) * int(out_shape[2])
    # tqdm's last state: "25/25 [10:02<00:00, 24.1s/it]" (windows done, elapsed<ETA, per window)
    bars = re.findall(r"\d+/\d+ \[[^\]]*\]", shown)
    result = {
        "volume": f"512x512x{args.slices}",
        "memory_gb": plans["memory_gb"]["value"],
        "sliding_window": window,
        "output_shape": list(out_shape),
        **measured,
        "output_voxels_per_s": voxels / measured["wall_s"],
        "progress_bar": bars[-1] if bars else "",
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result, indent=2))
    key = f"512 x 512 x {args.slices}" + ("" if args.preset == "small" else f" ({args.preset} preset)")
    row = (
        f"| {key} | {' x '.join(str(s) for s in out_shape)} | {result['memory_gb']:g} | "
        f"{window['roi_size'][0]}x{window['roi_size'][1]} x {window['plane_chunk']} | "
        f"{result['peak_rss_gib']:.2f} GB | {result['wall_s']:.0f} s | {result['output_voxels_per_s'] / 1e3:.0f} k | "
        f"`{result['progress_bar']}` | {load_before:.1f} / {load_after:.1f} |"
    )
    write_row(args.out, key, row)
    print(f"wrote the row for {key} into {args.out}")


if __name__ == "__main__":
    main()
