"""Quality and speed of the full self-supervised pipeline on real CT, against interpolation.

For each real volume (the isotropic NIfTI files as ground truth, and the DICOM series with its
own 2 mm spacing) and each factor r: make the thick input by slice removal, run what a user runs
on the thick input only (icmd_auto plan -> train -> predict, with a time budget), and score
against the ground truth (PSNR on all voxels and on synthesized slices, SSIM_a/c/s; HU clipped to
[-1024, 3071] and scaled to [0, 1]). Baselines in the same run: nearest, linear, cubic B-spline.

Rows are configurations of the same pipeline (icmd#... switches, no special code paths):
``default`` (the bundle's defaults), ``floor`` (only G_c/G_s on scale-matched in-plane pairs, no
axial network, no distillation, c/s mean), the seed's ablations and our extensions at r = 4.

    python benchmarks/quality.py --quick                 # one volume, r = 4, short budget (< 10 min)
    python benchmarks/quality.py                         # the full run (hours on 2 cores)

Writes docs/RESULTS.md (tables, figures, the command) and docs/results.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from icmd_auto import api  # noqa: E402
from icmd_auto.dataset import write_dataset_json  # noqa: E402
from icmd_auto.fingerprint import load_case_array  # noqa: E402
from icmd_auto.template import scripts  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "ct"
VOLUMES = {
    "chest_1.5mm": DATA / "totalseg_chest_1.5mm.nii.gz",
    "abdomen_3mm": DATA / "totalseg_example_ct_3mm.nii.gz",
    "dicom_2mm": DATA / "totalseg_dicom_series",
}
FLOOR = {"views": ["c", "s"], "fusion": "mean_cs", "internal_pairs": False, "inplane_pairs": True,
         "use_memory": False, "lambda_cmd": 0.0, "lambda_mem": 0.0}
SEED = {"views": ["a", "c", "s"], "fusion": "mean3", "internal_pairs": True, "inplane_pairs": False,
        "use_memory": True, "lambda_cmd": 0.15, "lambda_mem": 0.1, "num_levels": 2, "gamma": 0.25,
        "pixel_loss": "mse", "use_wavelet": True, "cmd_views": ["c", "s"], "slice_profile": "removal"}
# rows: name -> (method overrides, extra fusions evaluated from the same trained model)
MAIN_ROWS = {"default": ({}, ()), "floor": (FLOOR, ())}
ABLATION_ROWS = {
    "seed: final": (SEED, ("mean_cs", "a", "c", "s")),
    "seed: w/o L^cmd": ({**SEED, "lambda_cmd": 0.0}, ()),
    "seed: w/o L_c^cmd": ({**SEED, "cmd_views": ["s"]}, ()),
    "seed: w/o L_s^cmd": ({**SEED, "cmd_views": ["c"]}, ()),
    "seed: N=1": ({**SEED, "num_levels": 1}, ()),
    "seed: w/o WT": ({**SEED, "use_wavelet": False}, ()),
    "seed: w/o memory": ({**SEED, "use_memory": False}, ()),
    "seed + in-plane pairs": ({**SEED, "inplane_pairs": True}, ("mean_cs",)),
    "seed, slab-average profile": ({**SEED, "slice_profile": "average"}, ()),
    "seed, gamma 0.1": ({**SEED, "gamma": 0.1}, ()),
    "seed, gamma 0.5": ({**SEED, "gamma": 0.5}, ()),
    "seed, gamma 1.0": ({**SEED, "gamma": 1.0}, ()),
    "seed, L1 pixel loss": ({**SEED, "pixel_loss": "l1"}, ()),
}
METRICS = ("psnr_all", "psnr_syn", "ssim_a", "ssim_c", "ssim_s")
log = logging.getLogger("benchmark")


def load_ground_truth(path: Path) -> tuple[np.ndarray, np.ndarray]:
    array, affine, _ = load_case_array(path)
    return array.astype(np.float32), affine


def make_thick(gt: np.ndarray, affine: np.ndarray, factor: int, folder: Path) -> tuple[Path, np.ndarray]:
    """Slice removal: keep every r-th slice; returns the thick NIfTI and the covered ground truth."""
    covered = scripts.degradation.covered(gt.shape[2], factor)
    reference = gt[:, :, :covered]
    thick_affine = affine.copy()
    thick_affine[:3, 2] *= factor
    path = folder / "thick.nii.gz"
    nib.save(nib.Nifti1Image(np.round(reference[:, :, ::factor]).astype(np.int16), thick_affine), str(path))
    return path, reference


def score_all(pred: np.ndarray, reference: np.ndarray, factor: int) -> dict:
    return scripts.evaluation.score(torch.from_numpy(pred).double(), torch.from_numpy(reference).double(), factor)


def baselines(thick: np.ndarray, reference: np.ndarray, factor: int) -> tuple[dict, dict]:
    rows, speed = {}, {}
    for method in scripts.evaluation.BASELINES:
        start = time.perf_counter()
        pred = scripts.evaluation.interpolate_z(torch.from_numpy(thick), factor, method).numpy()
        speed[method] = pred.size / (time.perf_counter() - start)
        rows[method] = score_all(pred, reference, factor)
    return rows, speed


def run_row(thick_path: Path, reference: np.ndarray, factor: int, work: Path, budget_min: float, method: dict,
            fusions: tuple[str, ...], seed: int) -> dict:
    """plan -> train -> predict on the thick input, exactly as a user runs it."""
    work.mkdir(parents=True, exist_ok=True)
    dataset = write_dataset_json(work / "dataset.json", training=[str(thick_path)], name="benchmark")
    start = time.perf_counter()
    plans = api.plan(dataset, work, factor=factor, time_budget_min=budget_min, seed=seed, method=dict(method))
    planned = time.perf_counter()
    api.train(work, quiet=True)
    trained = time.perf_counter()
    results = {}
    for fusion in (None, *fusions):
        out = work / f"pred_{fusion or 'default'}.nii.gz"
        overrides = {} if fusion is None else {"icmd#fusion": fusion}
        t0 = time.perf_counter()
        api.predict(work, thick_path, out, overwrite=True, quiet=True, **overrides)
        seconds = time.perf_counter() - t0
        pred = np.asanyarray(nib.load(str(out)).dataobj).astype(np.float32)
        row = score_all(pred, reference, factor)
        row["predict_s"] = seconds
        row["voxels_per_s"] = pred.size / seconds
        results[fusion or "default"] = row
    metrics = [json.loads(line) for line in (work / "bundle" / "logs" / "train_metrics.jsonl").read_text().splitlines()]
    main = results.pop("default")
    main.update({"plan_s": planned - start, "train_s": trained - planned, "iterations": metrics[-1]["iteration"],
                 "epochs": metrics[-1]["epoch"], "preset": plans["preset"]["value"],
                 "patch": plans["patch_size"]["value"], "batch": plans["batch_size"]["value"],
                 "fusions": results})
    return main


def coronal_figure(reference: np.ndarray, linear: np.ndarray, ours: np.ndarray, path: Path) -> None:
    """GT | linear | ours | |linear - GT| | |ours - GT| on the middle coronal plane, window [-1000, 1000] HU."""
    from PIL import Image, ImageDraw

    y = reference.shape[1] // 2
    planes = [reference[:, y, :], linear[:, y, :], ours[:, y, :]]
    window = lambda a: np.clip((a + 1000.0) / 2000.0 * 255, 0, 255)  # noqa: E731
    errors = [np.clip(np.abs(p - planes[0]) / 500.0 * 255, 0, 255) for p in planes[1:]]
    tiles = [window(p) for p in planes] + errors
    tiles = [np.flipud(t.T).astype(np.uint8) for t in tiles]  # z up
    height = max(t.shape[0] for t in tiles)
    gap = np.zeros((height, 4), np.uint8)
    strip = np.concatenate(sum(([t, gap] for t in tiles), [])[:-1], axis=1)
    scale = max(1, 600 // strip.shape[1] + 1)
    img = Image.fromarray(strip).resize((strip.shape[1] * scale, strip.shape[0] * scale), Image.NEAREST)
    canvas = Image.new("L", (img.width, img.height + 16), 0)
    canvas.paste(img, (0, 16))
    draw = ImageDraw.Draw(canvas)
    width = (tiles[0].shape[1] + 4) * scale
    for i, label in enumerate(["ground truth", "linear", "ICMD-Auto", "|linear-GT|", "|ours-GT|"]):
        draw.text((i * width + 2, 2), label, fill=255)
    canvas.save(path)


def fmt(v: float, metric: str) -> str:
    return f"{v:.4f}" if metric.startswith("ssim") else f"{v:.2f}"


def table(results: dict, volumes: list[str], factors: list[int], rows: list[str]) -> str:
    """The seed's Table 1 layout: methods as rows, (volume, r, metric) as columns."""
    lines = []
    for volume in volumes:
        header = "| method | " + " | ".join(f"x{r} {m}" for r in factors for m in ("PSNR", "PSNR syn", "SSIM_a", "SSIM_c", "SSIM_s")) + " |"
        lines += [f"**{volume}**", "", header, "|---" * (1 + 5 * len(factors)) + "|"]
        for row in rows:
            cells = []
            for r in factors:
                entry = results.get(volume, {}).get(str(r), {}).get(row)
                cells += [fmt(entry[m], m) if entry else "" for m in METRICS]
            if any(cells):
                lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def gains(results: dict) -> str:
    lines = ["| volume | r | default - linear (dB, synthesized) | floor - linear | default - floor | train s | iterations |",
             "|---|---|---|---|---|---|---|"]
    for volume, by_r in results.items():
        for r, rows in by_r.items():
            if "linear" not in rows or "default" not in rows:
                continue
            lin = rows["linear"]["psnr_syn"]
            d = rows["default"]
            f = rows.get("floor")
            lines.append(f"| {volume} | {r} | {d['psnr_syn'] - lin:+.2f} | "
                         + (f"{f['psnr_syn'] - lin:+.2f} | {d['psnr_syn'] - f['psnr_syn']:+.2f}" if f else " | ")
                         + f" | {d['train_s']:.0f} | {d['iterations']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one volume (chest), r = 4, default and floor, 3 min each")
    parser.add_argument("--volumes", nargs="*", default=list(VOLUMES))
    parser.add_argument("--factors", nargs="*", type=int, default=[2, 3, 4])
    parser.add_argument("--budget_min", type=float, default=10.0, help="training time budget per run")
    parser.add_argument("--ablation_budget_min", type=float, default=None, help="budget of ablation rows (default: --budget_min)")
    parser.add_argument("--ablations", choices=["none", "first", "all"], default="first",
                        help="run the r=4 ablation rows on no volume, the first volume, or all volumes")
    parser.add_argument("--rows", nargs="*", default=None, help="only these main/ablation rows")
    parser.add_argument("--extra_rows", default=None,
                        help='JSON {"name": {icmd overrides}} of extra configurations to run as main rows')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "docs" / "RESULTS.md"))
    parser.add_argument("--json", default=str(REPO / "docs" / "results.json"))
    args = parser.parse_args()
    if args.quick:
        args.volumes, args.factors, args.budget_min, args.ablations = ["chest_1.5mm"], [4], 3.0, "none"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    for name in ("icmd_auto", "ignite", "monai"):
        logging.getLogger(name).setLevel(logging.WARNING)
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:])
    missing = [v for v in args.volumes if not VOLUMES[v].exists()]
    if missing:
        sys.exit(f"benchmark data not found: {[str(VOLUMES[v]) for v in missing]} (expected ../shared/data beside the repo)")
    results: dict = {}
    figures = []
    scratch = Path(tempfile.mkdtemp(prefix="icmd_bench_"))
    started = time.time()
    try:
        for vi, volume in enumerate(args.volumes):
            gt, affine = load_ground_truth(VOLUMES[volume])
            for factor in args.factors:
                folder = scratch / f"{volume}_x{factor}"
                folder.mkdir(parents=True)
                thick_path, reference = make_thick(gt, affine, factor, folder)
                thick = np.asanyarray(nib.load(str(thick_path)).dataobj).astype(np.float32)
                rows, speed = baselines(thick, reference, factor)
                cell = results.setdefault(volume, {}).setdefault(str(factor), {})
                cell.update(rows)
                cell["linear"]["voxels_per_s"] = speed["linear"]
                todo = dict(MAIN_ROWS)
                if args.extra_rows:
                    todo.update({k: (v, ("mean_cs",) if "a" in v.get("views", "acs") else ()) for k, v in json.loads(args.extra_rows).items()})
                if factor == 4 and (args.ablations == "all" or (args.ablations == "first" and vi == 0)):
                    todo.update(ABLATION_ROWS)
                if args.rows:
                    todo = {k: v for k, v in todo.items() if k in args.rows}
                for row, (method, fusions) in todo.items():
                    budget = args.budget_min if row not in ABLATION_ROWS else (args.ablation_budget_min or args.budget_min)
                    work = folder / row.replace(" ", "_").replace(":", "").replace("/", "")
                    log.info(f"{volume} x{factor} {row}: training {budget:g} min")
                    entry = run_row(thick_path, reference, factor, work, budget, method, fusions, args.seed)
                    for fusion, scores in entry.pop("fusions").items():
                        cell[f"{row} [fusion {fusion}]"] = scores
                    cell[row] = entry
                    log.info(f"{volume} x{factor} {row}: PSNR syn {entry['psnr_syn']:.2f} dB "
                             f"(linear {rows['linear']['psnr_syn']:.2f}), {entry['iterations']} iterations")
                    if row == "default":
                        pred = np.asanyarray(nib.load(str(work / "pred_default.nii.gz")).dataobj).astype(np.float32)
                        linear = scripts.evaluation.interpolate_z(torch.from_numpy(thick), factor, "linear").numpy()
                        fig = REPO / "docs" / "figures" / f"{volume}_x{factor}.png"
                        fig.parent.mkdir(parents=True, exist_ok=True)
                        coronal_figure(reference, linear, pred, fig)
                        figures.append(fig)
                    Path(args.json).write_text(json.dumps({"command": command, "results": results}, indent=1))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    hours = (time.time() - started) / 3600
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    row_order = ["default", "floor", "linear", "cubic", "nearest"] + [
        k for k in next(iter(next(iter(results.values())).values())) if k not in ("default", "floor", "linear", "cubic", "nearest")]
    all_rows = list(dict.fromkeys(row_order + [k for v in results.values() for c in v.values() for k in c]))
    report = [
        "# Results",
        "",
        f"Produced by `{command}` in {hours:.2f} h on this machine "
        f"({torch.get_num_threads()} threads, CPU), training budget {args.budget_min:g} min per run; "
        f"peak memory of the training processes {peak_gb:.2f} GB.",
        "",
        "## Gain over linear interpolation (synthesized slices)",
        "",
        gains(results),
        "",
        "## Table 1 layout (PSNR in dB on [0, 1]-scaled HU; PSNR = all voxels, PSNR syn = synthesized slices only)",
        "",
        table(results, list(results), args.factors, all_rows),
        "## Figures (middle coronal plane; window [-1000, 1000] HU; errors 0..500 HU)",
        "",
        *[f"![{f.stem}](figures/{f.name})" for f in figures],
        "",
    ]
    text = "\n".join(report)
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
