"""The dataset protocol: leave-one-out over the shared volumes, the prior zero-shot and fine-tuned.

For each volume V and factor r: the thick input D_r(V) (slice removal, as benchmarks/quality.py),
and the prior trained WITHOUT V (benchmarks/pretrain.py --leave_out V, one folder per run:
``<priors>/loo_<V>_x<r>/prior_x<r>.pt``). Rows, scored on synthesized slices against V:
  zero-shot      ``icmd_auto predict`` with no work folder (the LOO prior, no training);
  warm start     ``plan --init prior`` + ``train`` within ``--budget_min`` (the prior fine-tuned on V's
                 thick input), when --budget_min > 0;
  scratch        the per-scan default of the record (docs/results.json: the default row, its budget);
  linear, cubic  interpolation along z, in this run.

    python benchmarks/loo.py --priors runs/gpu_pretrain                 # zero-shot rows
    python benchmarks/loo.py --priors runs/gpu_pretrain --budget_min 10 # + warm start (CPU: 10 min each)

Writes the table into docs/RESULTS.md (between markers) and the numbers to docs/results_loo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (the same volumes, thick inputs and scores as the per-scan benchmark)

from icmd_auto import api  # noqa: E402
from icmd_auto.dataset import write_dataset_json  # noqa: E402
from icmd_auto.prior import PRIOR_DIR_VARIABLE  # noqa: E402

REPO = quality.REPO
BEGIN, END = "<!-- loo:begin -->", "<!-- loo:end -->"


def score(path: Path, reference: np.ndarray, factor: int) -> dict:
    pred = np.asanyarray(nib.load(str(path)).dataobj).astype(np.float32)
    return quality.score_all(pred, reference, factor)


def run_case(volume: str, factor: int, priors: Path, budget_min: float, root: Path) -> dict:
    gt, affine = quality.load_ground_truth(quality.VOLUMES[volume])
    folder = root / f"{volume}_x{factor}"
    folder.mkdir(parents=True, exist_ok=True)
    thick_path, reference = quality.make_thick(gt, affine, factor, folder)
    rows, _ = quality.baselines(reference[:, :, ::factor], reference, factor)
    rows = {k: rows[k] for k in ("linear", "cubic")}
    os.environ[PRIOR_DIR_VARIABLE] = str(priors / f"loo_{volume}_x{factor}")
    try:
        start = time.perf_counter()
        out = folder / "zero_shot.nii.gz"
        api.predict(None, thick_path, out, overwrite=True, quiet=True, factor=factor)
        rows["zero-shot"] = score(out, reference, factor) | {"seconds": time.perf_counter() - start}
        if budget_min > 0:
            work = folder / "warm"
            dataset = write_dataset_json(folder / "dataset.json", training=[str(thick_path)], name="loo")
            api.plan(dataset, work, factor=factor, time_budget_min=budget_min, init="prior")
            start = time.perf_counter()
            api.train(work, quiet=True)
            trained = time.perf_counter() - start
            out = folder / "warm.nii.gz"
            api.predict(work, thick_path, out, overwrite=True, quiet=True)
            rows[f"warm start {budget_min:g} min"] = score(out, reference, factor) | {"train_s": trained}
    finally:
        os.environ.pop(PRIOR_DIR_VARIABLE, None)
    record = json.loads((REPO / "docs" / "results.json").read_text())
    scratch = record["results"].get(volume, {}).get(str(factor), {}).get("default")
    if scratch:
        rows[f"scratch {record['budget_min']:g} min (record)"] = scratch
    return rows


def table(results: dict) -> str:
    lines = [
        "| volume | r | row | PSNR syn | gain over linear | SSIM_a | SSIM_c | SSIM_s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for volume, factors in results.items():
        for factor, rows in factors.items():
            linear = rows["linear"]["psnr_syn"]
            for name, row in rows.items():
                lines.append(
                    f"| {volume} | {factor} | {name} | {row['psnr_syn']:.2f} | {row['psnr_syn'] - linear:+.2f} | "
                    f"{row['ssim_a']:.4f} | {row['ssim_c']:.4f} | {row['ssim_s']:.4f} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--priors", type=Path, required=True, help="folder of loo_<V>_x<r> prior folders")
    parser.add_argument("--volumes", nargs="*", default=list(quality.VOLUMES))
    parser.add_argument("--factors", nargs="*", type=int, default=[2, 4])
    parser.add_argument("--budget_min", type=float, default=0.0, help="warm-start fine-tune budget (0: none)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "RESULTS.md")
    parser.add_argument("--record", type=Path, default=REPO / "docs" / "results_loo.json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="icmd_loo_") as tmp:
        for volume in args.volumes:
            for factor in args.factors:
                rows = run_case(volume, factor, args.priors, args.budget_min, Path(tmp))
                results.setdefault(volume, {})[factor] = rows
                print(
                    f"{volume} x{factor}: " + ", ".join(f"{k} {v['psnr_syn']:.2f}" for k, v in rows.items()),
                    flush=True,
                )
    command = "python benchmarks/loo.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = (
        f"{table(results)}\n\nCommand: `{command.strip()}` ({time.strftime('%Y-%m-%d')}); priors: "
        "benchmarks/gpu_pretrain.sh (each trained without the volume it is tested on)."
    )
    print(text)
    args.record.write_text(json.dumps({"command": command, "results": results}, indent=1) + "\n")
    quality.write_block(args.out, BEGIN, END, text, heading="## Dataset protocol: leave-one-out\n\n")


if __name__ == "__main__":
    main()
