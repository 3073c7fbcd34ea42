"""Does the planner's timing probe predict training? plan -> train on real CT, probe against the run.

For each factor: the thick input by slice removal from the shared chest CT, ``icmd_auto plan`` with
a time budget (the probe measures seconds per iteration and picks the CPU threads), ``icmd_auto train``,
then the
seconds per iteration the training actually ran (the median over the logged iterations, from the
time stamps of logs/train_metrics.jsonl, so validation epochs do not count) and the share of the
budget training used. With ``--score``, the prediction's synthesized-slice PSNR against linear.
``--conditions idle busy``: each run also beside one busy single-threaded process (a shared
workstation), started before planning and stopped after training, so probe and training see it.

    python benchmarks/probe.py                    # chest x4, a 2-minute plan (issue 19's check)
    python benchmarks/probe.py --conditions idle busy --score

Writes the table to docs/PERFORMANCE.md (between the probe markers) with the command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from quality import VOLUMES, baselines, load_ground_truth, make_thick, score_all, write_block  # noqa: E402

from icmd_auto import api  # noqa: E402
from icmd_auto.dataset import write_dataset_json  # noqa: E402

BEGIN, END = "<!-- probe:begin -->", "<!-- probe:end -->"
LOAD = {"idle": "idle", "busy": "one busy process"}


def logged_seconds_per_iteration(metrics: list[dict]) -> float:
    """Median seconds per iteration between consecutive logged iterations."""
    steps = [
        (b["time"] - a["time"]) / (b["iteration"] - a["iteration"])
        for a, b in zip(metrics, metrics[1:])
        if b["iteration"] > a["iteration"]
    ]
    return statistics.median(steps)


BUSY = "while True: pass"  # one core, busy until killed


def run(volume: str, factor: int, budget_min: float, work: Path, score: bool, condition: str) -> dict:
    gt, affine = load_ground_truth(VOLUMES[volume])
    thick_path, reference = make_thick(gt, affine, factor, work)
    dataset = write_dataset_json(work / "dataset.json", training=[str(thick_path)], name="probe")
    busy = subprocess.Popen([sys.executable, "-c", BUSY]) if condition == "busy" else None
    try:
        start = time.perf_counter()
        plans = api.plan(dataset, work, factor=factor, time_budget_min=budget_min)
        plan_s = time.perf_counter() - start
        summary = api.train(work, quiet=True)
    finally:
        if busy:
            busy.kill()
            busy.wait()
    metrics = [
        json.loads(line)
        for line in (work / "bundle" / "logs" / "train_metrics.jsonl").read_text().splitlines()
    ]
    planned = plans["seconds_per_iteration"]["value"]
    measured = logged_seconds_per_iteration(metrics)
    training = plans["training"]["value"]
    row = {
        "condition": condition,
        "volume": volume,
        "factor": factor,
        "budget_min": budget_min,
        "machine": plans["seconds_per_iteration"]["machine"],
        "threads": plans["threads"]["value"],
        "planned_s_per_it": planned,
        "measured_s_per_it": round(measured, 4),
        "ratio": round(planned / measured, 3),
        "planned_iterations": training["epochs"] * training["iterations_per_epoch"],
        "iterations": metrics[-1]["iteration"],
        "train_command_s": summary["seconds"],
        "training_s": round(metrics[-1]["time"] - metrics[0]["time"], 1),
        "plan_s": round(plan_s, 1),
        "samples_per_s": round(plans["batch_size"]["value"] / measured, 1),
        "probe_medians_by_threads": {
            threads: {stage: round(statistics.median(t), 4) for stage, t in per_stage.items()}
            for threads, per_stage in plans["seconds_per_iteration"]["timings"]["seconds"].items()
        },
    }
    if score:
        out = work / "pred.nii.gz"
        api.predict(work, thick_path, out, overwrite=True, quiet=True)
        pred = np.asanyarray(nib.load(str(out)).dataobj).astype(np.float32)
        ours = score_all(pred, reference, factor)
        thick = np.asanyarray(nib.load(str(thick_path)).dataobj).astype(np.float32)
        linear = baselines(thick, reference, factor)[0]["linear"]
        row["gain_over_linear_db"] = round(ours["psnr_syn"] - linear["psnr_syn"], 2)
    return row


def table(rows: list[dict]) -> str:
    head = (
        "| machine load | volume | r | budget | threads | planned s/it | measured s/it | planned / measured | "
        "iterations (planned) | logged training s | samples/s | gain over linear |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        gain = f"{r['gain_over_linear_db']:+.2f} dB" if "gain_over_linear_db" in r else "not scored"
        lines.append(
            f"| {LOAD[r['condition']]} | {r['volume']} | {r['factor']} | {r['budget_min']:g} min | {r['threads'] or 'default'} | "
            f"{r['planned_s_per_it']:.4g} | {r['measured_s_per_it']:.4g} | {r['ratio']:.2f} | "
            f"{r['iterations']} ({r['planned_iterations']}) | {r['training_s']:.0f} | {r['samples_per_s']:g} | {gain} |"
        )
    machines = sorted({r["machine"] for r in rows})
    return "\n".join(lines) + f"\n\nMachine: {'; '.join(machines)}."


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--volume", default="chest_1.5mm", choices=sorted(VOLUMES))
    parser.add_argument("--factors", nargs="*", type=int, default=[4])
    parser.add_argument("--budget_min", type=float, default=2.0)
    parser.add_argument("--score", action="store_true", help="also predict and score against linear")
    parser.add_argument("--conditions", nargs="*", choices=sorted(LOAD), default=["idle"])
    parser.add_argument("--out", default=str(REPO / "docs" / "PERFORMANCE.md"), help="'' to write nothing")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    rows = []
    for condition in args.conditions:
        for factor in args.factors:
            with tempfile.TemporaryDirectory(prefix="icmd_probe_") as tmp:
                rows.append(run(args.volume, factor, args.budget_min, Path(tmp), args.score, condition))
            print(json.dumps(rows[-1]), flush=True)
    text = table(rows)
    print(text)
    command = "python benchmarks/probe.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if args.out:
        write_block(
            Path(args.out),
            BEGIN,
            END,
            f"{text}\n\nCommand: `{command}` ({time.strftime('%Y-%m-%d')}).",
            heading="## The planner's timing probe against the training it plans\n\n",
        )


if __name__ == "__main__":
    main()
