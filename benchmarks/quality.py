"""Quality and speed of the full self-supervised pipeline on real CT, against interpolation.

For each real volume (the isotropic NIfTI files as ground truth, and the DICOM series with its
own 2 mm spacing) and each factor r: make the thick input by slice removal, run what a user runs
on the thick input only (icmd_auto plan -> train -> predict, with a time budget), and score
against the ground truth (PSNR on all voxels and on synthesized slices, SSIM_a/c/s; HU clipped to
[-1024, 3071] and scaled to [0, 1]). Baselines in the same run: nearest, linear, cubic B-spline.

Rows are configurations of the same pipeline (icmd#... switches, no special code paths):
``default`` (what the planner writes: its default recipe), ``floor`` (the ``inplane`` recipe: only
G_c/G_s on scale-matched in-plane pairs, no axial network, no distillation, c/s mean; when it is
the default recipe it is the default row, not run twice), and at r = 4 the seed's ablations (the
``icmd`` recipe with one switch changed) and our extensions.

    python benchmarks/quality.py --quick                 # one volume, r = 4, short budget (< 10 min)
    python benchmarks/quality.py                         # the full run (hours on 2 cores)

Writes docs/RESULTS.md (tables, figures, the command) and docs/results.json (--quick: the _quick files).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shlex
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

# the shared CT beside the repository; ICMD_CT_DATA names another folder holding the same files
# (a device machine, where ../shared does not travel)
DATA = Path(os.environ.get("ICMD_CT_DATA", REPO.parent / "shared" / "data" / "ct"))
VOLUMES = {
    "chest_1.5mm": DATA / "totalseg_chest_1.5mm.nii.gz",
    "abdomen_3mm": DATA / "totalseg_example_ct_3mm.nii.gz",
    "dicom_2mm": DATA / "totalseg_dicom_series",
}
# rows: name -> (recipe, icmd#... overrides over it, extra fusions evaluated from the same trained model)
FLOOR = ("inplane", {}, ())  # DESIGN 5's plain configuration, in our pipeline
SEED = {
    "num_levels": 2,
    "gamma": 0.25,
    "pixel_loss": "mse",
    "use_wavelet": True,
    "cmd_views": ["c", "s"],
    "slice_profile": "removal",
}  # the paper's values, spelled out (the icmd recipe's defaults)
MAIN_ROWS = {
    "default": (None, {}, ("c", "s")),
    "floor": FLOOR,
}  # the default recipe fuses c and s: each alone too
ABLATION_ROWS = {
    "seed: final": ("icmd", SEED, ("mean_cs", "a", "c", "s")),
    "seed: w/o L^cmd": ("icmd", {**SEED, "lambda_cmd": 0.0}, ()),
    "seed: w/o L_c^cmd": ("icmd", {**SEED, "cmd_views": ["s"]}, ()),
    "seed: w/o L_s^cmd": ("icmd", {**SEED, "cmd_views": ["c"]}, ()),
    "seed: N=1": ("icmd", {**SEED, "num_levels": 1}, ()),
    "seed: w/o WT": ("icmd", {**SEED, "use_wavelet": False}, ()),
    "seed: w/o memory": ("icmd", {**SEED, "use_memory": False}, ()),
    "seed + in-plane pairs": ("icmd", {**SEED, "inplane_pairs": True}, ("mean_cs",)),
    "seed, in-plane pairs instead of internal, N=1": (
        "icmd",
        {**SEED, "inplane_pairs": True, "internal_pairs": False, "num_levels": 1},
        ("mean_cs",),
    ),
    "seed, slab-average profile": ("icmd", {**SEED, "slice_profile": "average"}, ()),
    "seed, gamma 0.1": ("icmd", {**SEED, "gamma": 0.1}, ()),
    "seed, gamma 0.5": ("icmd", {**SEED, "gamma": 0.5}, ()),
    "seed, gamma 1.0": ("icmd", {**SEED, "gamma": 1.0}, ()),
    "seed, L1 pixel loss": ("icmd", {**SEED, "pixel_loss": "l1"}, ()),
    "in-plane (the default recipe)": ("inplane", {}, ()),  # the reference for the two below, at their budget
    "in-plane, L1 pixel loss": ("inplane", {"pixel_loss": "l1"}, ()),
    "in-plane, slab-average profile": ("inplane", {"slice_profile": "average"}, ()),
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
    return scripts.evaluation.score(
        torch.from_numpy(pred).double(), torch.from_numpy(reference).double(), factor
    )


def checkpoint_weights(checkpoint: str | Path) -> dict:
    """Overrides of inference.json that predict with a training checkpoint's network (its
    "network" entry) instead of the weights the bundle kept (models/model.pt)."""
    return {
        "checkpointloader#load_path": str(checkpoint),
        "checkpointloader#load_dict": {"network": "@network"},
    }


def baselines(thick: np.ndarray, reference: np.ndarray, factor: int) -> tuple[dict, dict]:
    rows, speed = {}, {}
    for method in scripts.evaluation.BASELINES:
        start = time.perf_counter()
        pred = scripts.evaluation.interpolate_z(torch.from_numpy(thick), factor, method).numpy()
        speed[method] = pred.size / (time.perf_counter() - start)
        rows[method] = score_all(pred, reference, factor)
    return rows, speed


def run_row(
    thick_path: Path,
    reference: np.ndarray,
    factor: int,
    work: Path,
    budget_min: float,
    recipe: str | None,
    method: dict,
    fusions: tuple[str, ...],
    seed: int,
) -> dict:
    """plan -> train -> predict on the thick input, exactly as a user runs it."""
    work.mkdir(parents=True, exist_ok=True)
    dataset = write_dataset_json(work / "dataset.json", training=[str(thick_path)], name="benchmark")
    start = time.perf_counter()
    plans = api.plan(
        dataset,
        work,
        factor=factor,
        time_budget_min=budget_min,
        seed=seed,
        recipe=recipe,
        method=dict(method),
    )
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
    metrics = [
        json.loads(line)
        for line in (work / "bundle" / "logs" / "train_metrics.jsonl").read_text().splitlines()
    ]
    main = results.pop("default")
    main.update(
        {
            "plan_s": planned - start,
            "train_s": trained - planned,
            "iterations": metrics[-1]["iteration"],
            "epochs": metrics[-1]["epoch"],
            "preset": plans["preset"]["value"],
            "recipe": plans["recipe"]["value"],
            "patch": plans["patch_size"]["value"],
            "batch": plans["batch_size"]["value"],
            "fusions": results,
        }
    )
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
        header = (
            "| method | "
            + " | ".join(
                f"x{r} {m}" for r in factors for m in ("PSNR", "PSNR syn", "SSIM_a", "SSIM_c", "SSIM_s")
            )
            + " |"
        )
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
    lines = [
        "| volume | r | default - linear (dB, synthesized) | floor - linear | default - floor | train s | "
        "iterations | predict voxels/s (default) | linear voxels/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for volume, by_r in results.items():
        for r, rows in by_r.items():
            if "linear" not in rows or "default" not in rows:
                continue
            lin = rows["linear"]["psnr_syn"]
            d = rows["default"]
            f = rows.get("floor")
            floor = (
                (
                    f"{f['psnr_syn'] - lin:+.2f} | {d['psnr_syn'] - f['psnr_syn']:+.2f}"
                    + (" (same run)" if f.get("same_as") else "")
                )
                if f
                else " | "
            )
            lines.append(
                f"| {volume} | {r} | {d['psnr_syn'] - lin:+.2f} | {floor} | {d['train_s']:.0f} | "
                f"{d['iterations']} | {d['voxels_per_s'] / 1e3:.0f} k | {rows['linear']['voxels_per_s'] / 1e6:.0f} M |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one volume (chest), r = 4, the default row (and the floor row when it differs), 3 min each",
    )
    parser.add_argument("--volumes", nargs="*", default=list(VOLUMES))
    parser.add_argument("--factors", nargs="*", type=int, default=[2, 3, 4])
    parser.add_argument("--budget_min", type=float, default=10.0, help="training time budget per run")
    parser.add_argument(
        "--ablation_budget_min",
        type=float,
        default=None,
        help="budget of ablation rows (default: --budget_min)",
    )
    parser.add_argument(
        "--ablations",
        choices=["none", "first", "all"],
        default="first",
        help="run the r=4 ablation rows on no volume, the first volume, or all volumes",
    )
    parser.add_argument("--rows", nargs="*", default=None, help="only these main/ablation rows")
    parser.add_argument(
        "--extra_rows",
        default=None,
        help='JSON {"name": {icmd overrides}} of extra configurations to run as main rows',
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--report_from", default=None, help="only rewrite --out from this JSON record of a run"
    )
    parser.add_argument(
        "--add_to",
        default=None,
        help="also add this run's model rows to that JSON record (e.g. docs/results.json), with the command",
    )
    parser.add_argument(
        "--out", default=None, help="default docs/RESULTS.md (--quick: docs/RESULTS_quick.md)"
    )
    parser.add_argument(
        "--json", default=None, help="default docs/results.json (--quick: docs/results_quick.json)"
    )
    args = parser.parse_args()
    suffix = "_quick" if args.quick else ""
    args.out = args.out or str(REPO / "docs" / f"RESULTS{suffix}.md")
    args.json = args.json or str(REPO / "docs" / f"results{suffix}.json")
    if args.quick:
        args.volumes, args.factors, args.budget_min, args.ablations = ["chest_1.5mm"], [4], 3.0, "none"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    for name in ("icmd_auto", "ignite", "monai"):
        logging.getLogger(name).setLevel(logging.WARNING)
    log.setLevel(logging.INFO)  # the benchmark's own lines, whatever level the root logger has
    command = "python benchmarks/quality.py " + shlex.join(sys.argv[1:])
    missing = [v for v in args.volumes if not VOLUMES[v].exists()]
    if missing:
        sys.exit(
            f"benchmark data not found: {[str(VOLUMES[v]) for v in missing]} (expected ../shared/data beside the repo)"
        )
    if args.report_from:
        write_report(Path(args.out), report(json.loads(Path(args.report_from).read_text())))
        print(f"wrote {args.out} from {args.report_from}")
        return
    results: dict = {}
    figures: list[str] = []
    record = {
        "command": command,
        "results": results,
        "figures": figures,
        "budget_min": args.budget_min,
        "ablation_budget_min": args.ablation_budget_min or args.budget_min,
        "machine": f"{scripts.runtime.cpu_cores()} CPU cores, {torch.get_num_threads()} torch threads, no GPU"
        if not torch.cuda.is_available()
        else torch.cuda.get_device_name(),
    }
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
                    todo.update(
                        {
                            k: (
                                v.pop("recipe", None),
                                v,
                                ("mean_cs",) if "a" in v.get("views", "acs") else (),
                            )
                            for k, v in json.loads(args.extra_rows).items()
                        }
                    )
                if factor == 4 and (args.ablations == "all" or (args.ablations == "first" and vi == 0)):
                    todo.update(ABLATION_ROWS)
                if args.rows:
                    todo = {k: v for k, v in todo.items() if k in args.rows}
                for row, (recipe, method, fusions) in todo.items():
                    if (
                        row == "floor"
                        and "default" in cell
                        and cell["default"]["recipe"] == FLOOR[0]
                        and not FLOOR[1]
                    ):
                        cell["floor"] = {
                            **cell["default"],
                            "same_as": "default",
                        }  # the same configuration and seed
                        log.info(f"{volume} x{factor} floor: the default configuration (not run twice)")
                        continue
                    budget = (
                        args.budget_min
                        if row not in ABLATION_ROWS
                        else (args.ablation_budget_min or args.budget_min)
                    )
                    work = folder / row.replace(" ", "_").replace(":", "").replace("/", "")
                    log.info(f"{volume} x{factor} {row}: training {budget:g} min")
                    entry = run_row(
                        thick_path, reference, factor, work, budget, recipe, method, fusions, args.seed
                    )
                    for fusion, scores in entry.pop("fusions").items():
                        cell[f"{row} [fusion {fusion}]"] = scores
                    cell[row] = entry
                    log.info(
                        f"{volume} x{factor} {row}: PSNR syn {entry['psnr_syn']:.2f} dB "
                        f"(linear {rows['linear']['psnr_syn']:.2f}), {entry['iterations']} iterations"
                    )
                    if row == "default":
                        pred = np.asanyarray(nib.load(str(work / "pred_default.nii.gz")).dataobj).astype(
                            np.float32
                        )
                        linear = scripts.evaluation.interpolate_z(
                            torch.from_numpy(thick), factor, "linear"
                        ).numpy()
                        # beside the report, in figures/ (a report other than RESULTS.md prefixes its name)
                        out = Path(args.out).absolute()
                        prefix = "" if out.name == "RESULTS.md" else f"{out.stem}_"
                        fig = out.parent / "figures" / f"{prefix}{volume}_x{factor}.png"
                        fig.parent.mkdir(parents=True, exist_ok=True)
                        coronal_figure(reference, linear, pred, fig)
                        figures.append(f"figures/{fig.name}")
                    Path(args.json).write_text(json.dumps(record, indent=1))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.add_to:
        add_rows(Path(args.add_to), record)
    record["hours"] = (time.time() - started) / 3600
    record["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    Path(args.json).write_text(json.dumps(record, indent=1))
    text = report(record)
    print(text)
    write_report(Path(args.out), text)


def report(record: dict) -> str:
    """The generated part of docs/RESULTS.md, from the JSON record of a run (complete or not)."""
    results = record["results"]
    first = ["default", "floor", "linear", "cubic", "nearest"]
    all_rows = list(dict.fromkeys(first + [k for v in results.values() for c in v.values() for k in c]))
    factors = sorted({int(r) for v in results.values() for r in v})
    hours = record.get("hours")
    return "\n".join(
        [
            f"Produced by `{record['command']}`"
            + (
                f" in {hours:.2f} h"
                if hours is not None
                else " (stopped before the end; the rows it finished)"
            )
            + f" on {record.get('machine', 'this machine')}; training budget {record.get('budget_min', '?')} min per "
            f"main row, {record.get('ablation_budget_min', '?')} min per ablation row (wall time, timing probe and "
            f"TimeLimit handler)"
            + (
                f"; peak RSS of the training processes {record['peak_rss_gb']:.2f} GB."
                if record.get("peak_rss_gb")
                else "."
            ),
            *[
                f"Row `{a['row']}` ({a['volume']}, x{a['factor']}) added to this record by `{a['command']}`."
                for a in record.get("added", [])
            ],
            "",
            "### Gain over linear interpolation (synthesized slices) and speed",
            "",
            gains(results),
            "",
            "### Table 1 layout (PSNR in dB on [0, 1]-scaled HU; PSNR = all voxels, PSNR syn = synthesized slices only)",
            "",
            table(results, list(results), factors, all_rows),
            "### Figures (middle coronal plane; window [-1000, 1000] HU; errors 0..500 HU)",
            "",
            *[f"![{Path(f).stem}]({f})" for f in record.get("figures", [])],
            "",
        ]
    )


def add_rows(target: Path, record: dict) -> None:
    """Merge the model rows of ``record`` into the record at ``target``, noting the command."""
    main = json.loads(target.read_text())
    for volume, by_r in record["results"].items():
        for factor, rows in by_r.items():
            for row, entry in rows.items():
                if row in scripts.evaluation.BASELINES:
                    continue
                main["results"].setdefault(volume, {}).setdefault(factor, {})[row] = entry
                if "[fusion" not in row:
                    added = {
                        "row": row,
                        "volume": volume,
                        "factor": int(factor),
                        "command": record["command"],
                    }
                    main.setdefault("added", []).append(added)
    target.write_text(json.dumps(main, indent=1))


BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"


def write_report(out: Path, text: str) -> None:
    """Replace the generated block of ``out``, keeping the text around it."""
    current = out.read_text() if out.exists() else f"# Results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in current:
        current += f"\n{BEGIN}\n{END}\n"
    head, rest = current.split(BEGIN, 1)
    out.write_text(f"{head}{BEGIN}\n{text}\n{END}{rest.split(END, 1)[1]}")


def write_block(out: Path, begin: str, end: str, text: str, heading: str = "") -> None:
    """Put ``text`` between the markers ``begin`` / ``end`` of ``out`` (appended, under ``heading``,
    when the markers are not there yet); the text around them is kept."""
    content = out.read_text() if out.exists() else ""
    block = f"{begin}\n{text}\n{end}"
    if begin in content:
        head, rest = content.split(begin, 1)
        content = head + block + rest.split(end, 1)[1]
    else:
        content = content.rstrip("\n") + f"\n\n{heading}{block}\n"
    out.write_text(content)


if __name__ == "__main__":
    main()
