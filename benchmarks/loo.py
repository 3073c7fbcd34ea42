"""The dataset protocol: leave-one-out over the shared volumes, the prior zero-shot and fine-tuned.

For each volume V and factor r: the thick input D_r(V) (slice removal, as benchmarks/quality.py),
and the prior trained WITHOUT V (``icmd_auto pretrain --leave_out <V's file name> --out <priors>/loo_<V>_x<r>``:
``<priors>/loo_<V>_x<r>/prior_x<r>.pt``, and ``<priors>/loo_<V>_x<r>_<preset>/`` for other presets).
Rows, scored on synthesized slices against V, all in this run:
  zero-shot (P)      ``icmd_auto predict`` with no work folder (the LOO prior of preset P, no training);
  warm start B min   ``plan --init prior`` + ``train`` within B minutes (the prior fine-tuned on V's thick
                     input), for each B of --budgets, at each learning-rate share of --warm_lr_shares;
  scratch B min      ``plan --init scratch`` + ``train`` within B minutes, for each B of --budgets;
  ..., last weights  a trained row's last weights instead of those its validation kept (model.pt);
  ..., prior + a x (kept - prior)  a warm start's kept weights averaged with the prior's (--averages);
  linear, cubic      interpolation along z.

    python benchmarks/loo.py --priors runs/gpu_pretrain                      # zero-shot rows
    python benchmarks/loo.py --priors runs/gpu_pretrain --budgets 3 10       # + warm start and scratch
    python benchmarks/loo.py --priors P --budgets 3 --warm_lr_shares 1 0.33 0.1  # the fine-tuning rate
    python benchmarks/loo.py --priors P --budgets 10 30 --recipe icmd --inits prior  # the paper's recipe, warm
    python benchmarks/loo.py --priors P --budgets 10 --inits prior --averages 0.75 0.5  # averaged with the prior

Writes the table into docs/RESULTS.md (between markers) and the numbers to docs/results_loo.json.
"""

from __future__ import annotations

import argparse
import json
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

from icmd_auto import api, runner  # noqa: E402
from icmd_auto.dataset import write_dataset_json  # noqa: E402
from icmd_auto.prior import directory_in_use  # noqa: E402
from icmd_auto.template import scripts  # noqa: E402

REPO = quality.REPO
BEGIN, END = "<!-- loo:begin -->", "<!-- loo:end -->"


def score(path: Path, reference: np.ndarray, factor: int) -> dict:
    pred = np.asanyarray(nib.load(str(path)).dataobj).astype(np.float32)
    return quality.score_all(pred, reference, factor)


def train_row(
    thick_path: Path,
    reference: np.ndarray,
    factor: int,
    work: Path,
    budget_min: float,
    init: str,
    lr_share: float | None = None,
    recipe: str | None = None,
    averages: tuple[float, ...] = (),
) -> dict:
    """plan (``init``, ``recipe``: the planner's when None) -> train within ``budget_min`` -> predict,
    scored; ``lr_share`` scales the preset's learning rate of a warm start (the planner's share when None).
    With ``averages``, a warm start's kept weights are also scored averaged with the prior's, for each
    a: prior + a (kept - prior) (WiSE-FT's weight interpolation)."""
    dataset = write_dataset_json(work.parent / f"{work.name}.json", training=[str(thick_path)], name="loo")
    recipe_option = {"recipe": recipe} if recipe else {}
    plans = api.plan(dataset, work, factor=factor, time_budget_min=budget_min, init=init, **recipe_option)
    overrides = {}
    if lr_share is not None:
        overrides["learning_rate"] = plans["preset_values"]["learning_rate"] * lr_share
    start = time.perf_counter()
    api.train(work, quiet=True, **overrides)
    trained = time.perf_counter() - start
    out = work.parent / f"{work.name}.nii.gz"
    api.predict(work, thick_path, out, overwrite=True, quiet=True)
    row = score(out, reference, factor) | {
        "train_s": trained,
        "learning_rate": plans["training"]["value"]["learning_rate"]
        if lr_share is None
        else overrides["learning_rate"],
    }
    models = work / "bundle" / "models"
    last = scripts.handlers.checkpoint.latest_checkpoint(str(models))
    variants = row["variants"] = {}
    if (
        last is not None and plans["validation"]["value"]["holdout_slices"]
    ):  # model.pt: the best by validation
        # the run's last checkpoint instead of model.pt: its network, through the bundle's own loader
        api.predict(work, thick_path, out, overwrite=True, quiet=True, **quality.checkpoint_weights(last))
        variants["last weights"] = score(out, reference, factor) | {"checkpoint": Path(last).name}
    if averages and init == "prior":
        net = runner.config_value(work / "bundle", ["inference.json"], "network_def")
        fresh = net.load_prior(torch.load(models / "prior.pt", map_location="cpu", weights_only=True))
        if fresh:  # their start was a random draw this process cannot repeat
            raise SystemExit(
                f"--averages: the prior holds no {', '.join(fresh)} (recipe {recipe!r}): nothing to average"
            )
        start = net.state_dict()
        kept = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
        for a in averages:
            mixed = {
                k: start[k] + a * (v - start[k]) if v.is_floating_point() else v for k, v in kept.items()
            }
            path = work / f"average_{a:g}.pt"
            torch.save({"network": mixed}, path)
            api.predict(work, thick_path, out, overwrite=True, quiet=True, **quality.checkpoint_weights(path))
            variants[f"prior + {a:g} x (kept - prior)"] = score(out, reference, factor)
    return row


def prior_folders(priors: Path, volume: str, factor: int) -> dict[str, Path]:
    """The leave-one-out priors of (volume, factor): {"": default preset folder, preset: folder}."""
    base = f"loo_{volume}_x{factor}"
    found = {"": priors / base} if (priors / base).is_dir() else {}
    for folder in sorted(priors.glob(f"{base}_*")):
        found[folder.name[len(base) + 1 :]] = folder
    if not found:
        raise SystemExit(
            f"{priors}: no {base} folder (icmd_auto pretrain --factor {factor} --leave_out <{volume}'s file name> "
            f"--out {priors / base})"
        )
    return found


def run_case(
    volume: str,
    factor: int,
    priors: Path,
    budgets: list[float],
    lr_shares: list[float | None],
    root: Path,
    inits: tuple[str, ...] = ("prior", "scratch"),
    recipe: str | None = None,
    averages: tuple[float, ...] = (),
) -> dict:
    gt, affine = quality.load_ground_truth(quality.VOLUMES[volume])
    folder = root / f"{volume}_x{factor}"
    folder.mkdir(parents=True, exist_ok=True)
    thick_path, reference = quality.make_thick(gt, affine, factor, folder)
    rows, _ = quality.baselines(reference[:, :, ::factor], reference, factor)
    rows = {k: rows[k] for k in ("linear", "cubic")}
    folders = prior_folders(priors, volume, factor)
    for preset, prior_folder in folders.items():
        with directory_in_use(prior_folder):
            start = time.perf_counter()
            out = folder / f"zero_shot_{preset or 'default'}.nii.gz"
            api.predict(None, thick_path, out, overwrite=True, quiet=True, factor=factor)
            name = f"zero-shot ({preset})" if preset else "zero-shot"
            rows[name] = score(out, reference, factor) | {"seconds": time.perf_counter() - start}
    tag = f" ({recipe})" if recipe else ""
    for budget in budgets:
        if "prior" in inits:
            with directory_in_use(folders.get("", next(iter(folders.values())))):
                for share in lr_shares:
                    name = f"warm start {budget:g} min{tag}" + ("" if share is None else f", lr x{share:g}")
                    work = folder / f"warm_{budget:g}_{share}_{recipe}"
                    row = train_row(
                        thick_path, reference, factor, work, budget, "prior", share, recipe, averages
                    )
                    add_trained(rows, name, row)
        if "scratch" in inits:
            work = folder / f"scratch_{budget:g}_{recipe}"
            row = train_row(thick_path, reference, factor, work, budget, "scratch", recipe=recipe)
            add_trained(rows, f"scratch {budget:g} min{tag}", row)
    return rows


def add_trained(rows: dict, name: str, row: dict) -> None:
    """A trained row (the weights kept by validation, what the bundle keeps) and the same run's other
    weights as the rows after it: its last weights (where validation chose), averages with the prior."""
    variants = row.pop("variants")
    rows[name] = row
    for what, scores in variants.items():
        rows[f"{name}, {what}"] = scores


def priors_summary(priors: Path) -> str:
    """What trained the priors, from their cards: device, iterations, data."""
    parts = []
    for folder in sorted(priors.glob("loo_*_x*")):
        factor = folder.name.split("_x")[-1].split("_")[0]
        card_path = folder / f"prior_x{factor}.json"
        if not card_path.is_file():
            continue
        card = json.loads(card_path.read_text())
        parts.append(
            f"{folder.name}: {card['iterations']} iterations on {card['device']}, {len(card['data'])} volumes"
        )
    return "; ".join(parts) or str(priors)


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
    parser.add_argument(
        "--budgets",
        nargs="*",
        type=float,
        default=[],
        help="training budgets (min) of the warm-start and scratch rows",
    )
    parser.add_argument(
        "--warm_lr_shares",
        nargs="*",
        type=float,
        default=None,
        help="warm-start learning rates as shares of the preset's (default: the planner's share)",
    )
    parser.add_argument(
        "--inits",
        nargs="*",
        choices=("prior", "scratch"),
        default=["prior", "scratch"],
        help="the trained rows: warm start from the prior and/or from scratch",
    )
    parser.add_argument("--recipe", default=None, help="the trained rows' recipe (default: the planner's)")
    parser.add_argument(
        "--averages",
        nargs="*",
        type=float,
        default=[],
        help="also score each warm start's kept weights averaged with the prior's: prior + a (kept - prior)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "RESULTS.md")
    parser.add_argument("--record", type=Path, default=REPO / "docs" / "results_loo.json")
    args = parser.parse_args()
    torch.set_num_threads(scripts.runtime.cpu_cores())
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="icmd_loo_") as tmp:
        for volume in args.volumes:
            for factor in args.factors:
                rows = run_case(
                    volume,
                    factor,
                    args.priors,
                    args.budgets,
                    args.warm_lr_shares or [None],
                    Path(tmp),
                    tuple(args.inits),
                    args.recipe,
                    tuple(args.averages),
                )
                results.setdefault(volume, {})[factor] = rows
                print(
                    f"{volume} x{factor}: " + ", ".join(f"{k} {v['psnr_syn']:.2f}" for k, v in rows.items()),
                    flush=True,
                )
    command = "python benchmarks/loo.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = (
        f"{table(results)}\n\nCommand: `{command.strip()}` ({time.strftime('%Y-%m-%d')}); priors: "
        f"{priors_summary(args.priors)} (each trained without the volume it is tested on)."
    )
    print(text)
    args.record.write_text(json.dumps({"command": command, "results": results}, indent=1) + "\n")
    quality.write_block(args.out, BEGIN, END, text, heading="## Dataset protocol: leave-one-out\n\n")


if __name__ == "__main__":
    main()
