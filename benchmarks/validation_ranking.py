"""Does the self-supervised validation PSNR rank checkpoints as the true synthesized-slice PSNR does?

The chest CT made thick by slice removal (as benchmarks/quality.py does), the default plan
(``icmd_auto plan``, only the factor given), trained with every epoch's checkpoint kept; then
each checkpoint's network predicts the thick volume and is scored against the thin original
(synthesized-slice PSNR, the evaluation protocol's HU scale). The validation PSNR of each epoch
comes from the training's own log (logs/validation_metrics.jsonl): no thin data is used for it.

    python benchmarks/validation_ranking.py                  # x4, the default plan as planned here
    python benchmarks/validation_ranking.py --seconds_per_iteration 0.385 --no_time_limit --every_epoch
    python benchmarks/validation_ranking.py --plan_only ...  # then, e.g. on another machine:
    python benchmarks/validation_ranking.py --from_plan ...  # train and score what --plan_only planned

``--seconds_per_iteration`` plans the schedule from a recorded step time instead of a timing
probe (the same plan on a busy machine), ``--no_time_limit`` lets the planned epochs finish
however long a busy machine takes, ``--every_epoch`` validates after every epoch (a row per
epoch; the plan's own interval may be longer). ``--plan_only`` stops after planning (the work
folder, the thick input and the reference are in ``--work``), ``--from_plan`` trains and scores a
work folder planned so. Writes a JSON record (default docs/results_validation.json) and prints the
table docs/RESULTS.md quotes.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from quality import VOLUMES, checkpoint_weights, load_ground_truth, make_thick  # noqa: E402

from icmd_auto import api  # noqa: E402
from icmd_auto.dataset import write_dataset_json  # noqa: E402
from icmd_auto.template import scripts  # noqa: E402
from icmd_auto.timing import machine_description  # noqa: E402

evaluation = scripts.evaluation


def psnr_syn(pred: np.ndarray, reference: np.ndarray, factor: int) -> float:
    """Synthesized-slice PSNR (dB) on the evaluation protocol's [0, 1] HU scale."""
    pred_u = evaluation.to_unit(torch.from_numpy(pred))
    ref_u = evaluation.to_unit(torch.from_numpy(reference))
    syn = evaluation.synthesized_mask(reference.shape[-1], factor)
    return evaluation.psnr(pred_u[..., syn], ref_u[..., syn])


def checkpoints(models: Path) -> list[tuple[int, Path]]:
    found = [(int(p.stem.split("_")[1]), p) for p in models.glob("checkpoint_*.pt")]
    return sorted(found)


def table(record: dict) -> str:
    rows = record["rows"]
    best_val = max(rows, key=lambda r: r["val_psnr"])["epoch"]
    best_true = max(rows, key=lambda r: r["true_psnr_syn"])["epoch"]
    last = rows[-1]["epoch"]
    lines = [
        "| epoch | iteration | validation PSNR (dB) | val c / s | true PSNR syn (dB) | - linear | |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        marks = [
            m
            for m, e in (("best by validation: model.pt", best_val), ("best true", best_true), ("last", last))
            if e == r["epoch"]
        ]
        lines.append(
            f"| {r['epoch']} | {r['iteration']} | {r['val_psnr']:.3f} | {r['val_psnr_c']:.2f} / "
            f"{r['val_psnr_s']:.2f} | {r['true_psnr_syn']:.3f} | {r['true_psnr_syn'] - record['linear_psnr_syn']:+.2f} "
            f"| {', '.join(marks)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--seconds_per_iteration", type=float, default=None)
    parser.add_argument("--no_time_limit", action="store_true")
    parser.add_argument("--every_epoch", action="store_true")
    parser.add_argument("--plan_only", action="store_true")
    parser.add_argument("--from_plan", action="store_true")
    parser.add_argument("--work", default="/tmp/icmd_validation_ranking")
    parser.add_argument("--json", default=str(REPO / "docs" / "results_validation.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
    log = logging.getLogger("validation_ranking")
    command = "python benchmarks/validation_ranking.py " + shlex.join(sys.argv[1:])
    root, factor = Path(args.work).absolute(), args.factor
    work, thick_path = root / "work", root / "thick.nii.gz"
    if not args.from_plan:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        gt, affine = load_ground_truth(VOLUMES["chest_1.5mm"])
        thick_path, reference = make_thick(gt, affine, factor, root)
        np.save(root / "reference.npy", reference)
        dataset = write_dataset_json(root / "dataset.json", training=[str(thick_path)], name="chest")
        api.plan(dataset, work, factor=factor, seconds_per_iteration=args.seconds_per_iteration)
        (root / "plan_command.txt").write_text(command + "\n")
        if args.plan_only:
            return
    plans = json.loads((work / "plans.json").read_text())
    reference = np.load(root / "reference.npy")
    thick = np.asanyarray(nib.load(str(thick_path)).dataobj).astype(np.float32)
    linear = psnr_syn(evaluation.interpolate_z(thick, factor, "linear").numpy(), reference, factor)
    overrides = {"train#checkpoint#n_saved": 100000}
    if args.every_epoch:
        overrides["validation#interval"] = 1
    if args.no_time_limit:
        overrides["time_limit_s"] = 0
    log.info(f"training with {overrides}")
    start = time.perf_counter()
    summary = api.train(work, quiet=True, **overrides)
    train_s = time.perf_counter() - start
    logs = work / "bundle" / "logs"
    validations = {
        r["epoch"]: r for r in map(json.loads, (logs / "validation_metrics.jsonl").read_text().splitlines())
    }
    iterations = {}
    for r in map(json.loads, (logs / "train_metrics.jsonl").read_text().splitlines()):
        iterations[r["epoch"]] = max(iterations.get(r["epoch"], 0), r["iteration"])

    rows = []
    for epoch, path in checkpoints(work / "bundle" / "models"):  # each checkpoint's network, predicted
        if epoch not in validations:
            continue
        out = root / f"pred_{epoch}.nii.gz"
        api.predict(work, thick_path, out, overwrite=True, quiet=True, **checkpoint_weights(path))
        pred = np.asanyarray(nib.load(str(out)).dataobj).astype(np.float32)
        out.unlink()
        v = validations[epoch]
        rows.append(
            {
                "epoch": epoch,
                "iteration": iterations.get(epoch),
                "val_psnr": v["val_psnr"],
                "val_psnr_c": v.get("val_psnr_c"),
                "val_psnr_s": v.get("val_psnr_s"),
                "true_psnr_syn": psnr_syn(pred, reference, factor),
            }
        )
        log.info(f"epoch {epoch}: validation {v['val_psnr']:.3f} dB, true {rows[-1]['true_psnr_syn']:.3f} dB")

    model = torch.load(work / "bundle" / "models" / "model.pt", map_location="cpu", weights_only=True)
    best_val = max(rows, key=lambda r: r["val_psnr"])
    best_network = torch.load(
        work / "bundle" / "models" / f"checkpoint_{best_val['epoch']}.pt",
        map_location="cpu",
        weights_only=True,
    )["network"]
    model_is_best = all(torch.equal(model[k], best_network[k]) for k in best_network)
    rho = spearmanr([r["val_psnr"] for r in rows], [r["true_psnr_syn"] for r in rows]).statistic
    late = rows[len(rows) // 2 :]
    rho_late = spearmanr([r["val_psnr"] for r in late], [r["true_psnr_syn"] for r in late]).statistic
    record = {
        "command": command,
        "plan_command": (root / "plan_command.txt").read_text().strip(),
        "trained_on": machine_description(),
        "plan": {
            k: plans[k]["value"] for k in ("factor", "recipe", "preset", "training", "validation", "amp")
        },
        "overrides": overrides,
        "train_s": round(train_s, 1),
        "validation_s": round(sum(v.get("seconds", 0.0) for v in validations.values()), 1),
        "iterations": summary.get("last", {}).get("iteration"),
        "linear_psnr_syn": linear,
        "rows": rows,
        "spearman": rho,
        "spearman_second_half": rho_late,
        "model_pt_is_best_validation_checkpoint": model_is_best,
    }
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(table(record))
    print(
        f"Spearman (all {len(rows)} checkpoints) {rho:.3f}, second half {rho_late:.3f}; model.pt is the "
        f"best-validation checkpoint: {model_is_best}; validation took {record['validation_s']} s of {train_s:.0f} s"
    )


if __name__ == "__main__":
    main()
