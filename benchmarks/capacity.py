"""Network capacity for the priors: held-out zero-shot gain against the cost of a prediction.

Each candidate is a prior folder that ``icmd_auto pretrain`` wrote for one factor, trained on the
same data for about the same CPU time, with the test volumes left out (``--leave_out``); they differ
in the network (``--preset``) or its training (``--reparam``). In one process, for each candidate:

  1. zero-shot ``icmd_auto predict`` (the candidate as the prior folder, no training) on the thick
     input of every test volume (slice removal, as benchmarks/quality.py and loo.py), scored on the
     synthesized slices against the volume; linear and cubic interpolation on the same inputs;
  2. the whole ``icmd_auto predict --factor r`` command, zero-shot with the candidate, on a
     512 x 512 x S phantom (benchmarks/speed.py's measurement: wall time, peak RSS, stages), in
     seconds per input slice against the limit of issue 22 (0.6 s on this machine, whole command).

    python benchmarks/capacity.py --candidates small=runs/x4_small medium=runs/x4_medium \
        rep=runs/x4_rep --volumes chest_1.5mm abdomen_3mm --factor 4 --slices 100

Time it on an otherwise idle machine (pause background jobs: the seconds are the product's).
Writes the table into docs/RESULTS.md (between markers) and the numbers to docs/results_capacity.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loo  # noqa: E402  (scores a zero-shot prediction as the leave-one-out protocol does)
import quality  # noqa: E402
import speed  # noqa: E402

from icmd_auto import api  # noqa: E402
from icmd_auto.prior import directory_in_use  # noqa: E402
from icmd_auto.template import scripts  # noqa: E402

REPO = quality.REPO
BEGIN, END = "<!-- capacity:begin -->", "<!-- capacity:end -->"
LIMIT_S_PER_SLICE = 0.6  # issue 22: the shipped network's whole predict command, per input slice


def card_of(folder: Path, factor: int) -> dict:
    path = folder / f"prior_x{factor}.json"
    if not path.is_file():
        raise SystemExit(
            f"{folder}: no prior_x{factor}.json (icmd_auto pretrain --factor {factor} --out {folder})"
        )
    return json.loads(path.read_text())


def parameters(card: dict, factor: int) -> int:
    """Parameters of the network the prior ships (folded: what prediction runs)."""
    from icmd_auto.planner import PRESETS, RECIPES, build_network

    net = build_network(factor, PRESETS[card["preset"]], RECIPES[card["recipe"]])
    return sum(p.numel() for p in net.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--candidates", nargs="+", required=True, help="NAME=PRIOR_DIR, in table order")
    parser.add_argument("--volumes", nargs="+", default=["chest_1.5mm", "abdomen_3mm"])
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument(
        "--slices", type=int, default=100, help="input slices of the speed phantom (0: no speed)"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/icmd_capacity"))
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "RESULTS.md")
    parser.add_argument("--record", type=Path, default=REPO / "docs" / "results_capacity.json")
    args = parser.parse_args()
    candidates = {}
    for item in args.candidates:
        name, _, folder = item.partition("=")
        if not folder:
            raise SystemExit(f"--candidates: {item!r} is not NAME=PRIOR_DIR")
        candidates[name] = Path(folder)
    cards = {name: card_of(folder, args.factor) for name, folder in candidates.items()}
    factor = args.factor
    torch.set_num_threads(scripts.runtime.cpu_cores())

    results = {"volumes": {}, "candidates": {}}
    with tempfile.TemporaryDirectory(prefix="icmd_capacity_") as tmp:
        for volume in args.volumes:
            gt, affine = quality.load_ground_truth(quality.VOLUMES[volume])
            folder = Path(tmp) / volume
            folder.mkdir()
            thick_path, reference = quality.make_thick(gt, affine, factor, folder)
            rows, _ = quality.baselines(reference[:, :, ::factor], reference, factor)
            rows = {k: rows[k] for k in ("linear", "cubic")}
            for name, prior in candidates.items():
                out = folder / f"{name}.nii.gz"
                with directory_in_use(prior):
                    start = time.perf_counter()
                    api.predict(None, thick_path, out, overwrite=True, quiet=True, factor=factor)
                rows[name] = loo.score(out, reference, factor) | {"seconds": time.perf_counter() - start}
                print(
                    f"{volume} x{factor} {name}: {rows[name]['psnr_syn'] - rows['linear']['psnr_syn']:+.2f} dB",
                    flush=True,
                )
            results["volumes"][volume] = rows

    device = torch.device("cpu")
    rooflines = {amp: speed.roofline_gflops(device, amp) for amp in ("fp32", "bf16")} if args.slices else {}
    for name, prior in candidates.items():
        card = cards[name]
        entry = {
            "preset": card["preset"],
            "reparam": bool(card.get("reparam")),
            "parameters": parameters(card, factor),
            "cpu_hours": card.get("cpu_hours"),
            "iterations": card["iterations"],
            "validation_best": card["validation"]["best"],
            "gains": {
                v: rows[name]["psnr_syn"] - rows["linear"]["psnr_syn"]
                for v, rows in results["volumes"].items()
            },
        }
        if args.slices:
            with directory_in_use(prior):
                measured = speed.measure(args.slices, args.work / name, rooflines, [], zero_shot=True)
            entry["predict"] = measured
            entry["seconds_per_input_slice"] = measured["wall_s"] / args.slices
        results["candidates"][name] = entry

    command = "python benchmarks/capacity.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = f"{table(results, factor, args.slices)}\n\nCommand: `{command}` ({time.strftime('%Y-%m-%d')}, {speed.cpu_description()})."
    print(text)
    quality.write_block(args.out, BEGIN, END, text, heading="### Network capacity (issue 22)\n\n")
    args.record.write_text(
        json.dumps({"command": command, "factor": factor, **results}, indent=1, default=str) + "\n"
    )
    print(f"wrote {args.out} and {args.record}")


def table(results: dict, factor: int, slices: int) -> str:
    volumes = list(results["volumes"])
    head = "| candidate | network | parameters | CPU-hours | held-out val (dB, vs linear) | "
    head += " | ".join(f"{v} x{factor} gain" for v in volumes) + " | mean gain |"
    if slices:
        head += f" predict 512x512x{slices} (s) | s per input slice | peak RSS (GiB) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, c in results["candidates"].items():
        best = c["validation_best"]
        network = c["preset"] + (", trained re-parameterised" if c["reparam"] else "")
        gains = [c["gains"][v] for v in volumes]
        row = (
            f"| {name} | {network} | {c['parameters']:,} | {c['cpu_hours'] or 0:.2f} | "
            f"{best['psnr']:.2f} ({best['psnr'] - best['linear']:+.2f}) | "
            + " | ".join(f"{g:+.2f}" for g in gains)
            + f" | {sum(gains) / len(gains):+.2f} |"
        )
        if slices:
            p = c["predict"]
            flag = "" if c["seconds_per_input_slice"] <= LIMIT_S_PER_SLICE else " (over 0.6)"
            row += (
                f" {p['wall_s']:.1f} | {c['seconds_per_input_slice']:.2f}{flag} | {p['peak_rss_gib']:.2f} |"
            )
        lines.append(row)
    for v in volumes:
        rows = results["volumes"][v]
        lines.append("")
        lines.append(
            f"{v} x{factor}: linear {rows['linear']['psnr_syn']:.2f} dB, cubic {rows['cubic']['psnr_syn']:.2f} dB on "
            "the synthesized slices; SSIM_a/c/s "
            + "; ".join(f"{n} {r['ssim_a']:.4f}/{r['ssim_c']:.4f}/{r['ssim_s']:.4f}" for n, r in rows.items())
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
