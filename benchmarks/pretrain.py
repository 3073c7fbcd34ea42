"""Pretrain the shipped CT prior: G_c/G_s on scale-matched in-plane pairs of a set of CT volumes.

The prior is the ``inplane`` recipe's network (one HAN-style G_c = G_s, coronal/sagittal mean)
trained once, for hours of CPU or minutes of GPU, on every volume given, so that a user's scan
needs no training (zero-shot) or only a short fine-tune (warm start). The pairs are the ones the
per-scan recipe trains on (``ICMDIteration.planar_inplane``: axial slices degraded by r along x or
y), with the resampling scale (in-plane spacing / target slice spacing) drawn per step from
``--scale_range`` instead of fixed by one dataset, so one prior serves scans of any spacing.
``--zpairs`` adds supervised pairs from the near-isotropic volumes' own z-axis (their coronal and
sagittal planes degraded along z), a switch measured in docs/RESULTS.md.

    # the shipped priors, r = 2..6, on all CT in ../shared/data (GPU: minutes each)
    python benchmarks/pretrain.py --factors 2 3 4 5 6 --minutes 5 --out icmd_auto/priors
    # a leave-one-out prior for the benchmark (not trained on the chest volume)
    python benchmarks/pretrain.py --factors 4 --leave_out chest_1.5mm --out runs/loo_chest

Each factor writes ``prior_x{r}.pt`` (the ICMDNet state dict, the best by the held-out
validation PSNR) and ``prior_x{r}.json`` (architecture, intensity standardisation, data, the
command, the validation curve) to ``--out``; ``--resume`` continues from ``prior_x{r}.ckpt``.
Validation: every 8th axial slice of each volume is held out of training; its in-plane pairs at
scale 1 give the PSNR of the prior and of linear interpolation on the same pixels.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from icmd_auto.fingerprint import load_case_array  # noqa: E402
from icmd_auto.planner import PRESETS, build_iteration, build_network  # noqa: E402
from icmd_auto.template import scripts  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "ct"
VOLUMES = {
    "chest_1.5mm": "totalseg_chest_1.5mm.nii.gz",
    "abdomen_3mm": "totalseg_example_ct_3mm.nii.gz",
    "dicom_2mm": "totalseg_dicom_series",
}
DATA_LICENCE = (
    "CT from the public test files of the TotalSegmentator project (github.com/wasserth/TotalSegmentator, "
    "tests/reference_files/, Apache-2.0); images from the TotalSegmentator CT dataset (Wasserthal et al., "
    "Radiology: AI 2023, doi:10.1148/ryai.230024), CC BY 4.0"
)
RECIPE = "inplane"
HOLD_OUT_EVERY = 8  # every 8th axial slice is validation only
ISOTROPIC_TOLERANCE = 0.1  # z-spacing within 10% of the in-plane spacing: the z-axis gives true pairs


def load_volumes(
    data: Path, leave_out: list[str]
) -> dict[str, tuple[np.ndarray, tuple[float, float, float]]]:
    volumes = {}
    for name, file in VOLUMES.items():
        if name in leave_out:
            continue
        array, affine, _ = load_case_array(data / file)
        volumes[name] = (array.astype(np.float32), scripts.io.voxel_spacing(affine))
    unknown = set(leave_out) - set(VOLUMES)
    if unknown:
        raise SystemExit(f"--leave_out {sorted(unknown)}: not one of {sorted(VOLUMES)}")
    return volumes


def intensity_statistics(volumes: dict) -> dict:
    """nnU-Net's CTNormalization over the pretraining set: pooled 0.5/99.5 percentiles, clipped mean/std."""
    pooled = np.concatenate([v.reshape(-1)[:: max(v.size // 2_000_000, 1)] for v, _ in volumes.values()])
    low, high = np.percentile(pooled, [0.5, 99.5])
    clipped = np.clip(pooled, low, high)
    return {
        "clip_low": float(low),
        "clip_high": float(high),
        "mean": float(clipped.mean()),
        "std": float(clipped.std()),
        "clip_image": False,
    }


class InplaneSampler:
    """Batches of standardised axial slices (training) and the held-out validation pairs."""

    def __init__(self, volumes: dict, intensity: dict, device: torch.device, zpairs: bool):
        self.slices, self.holdout, self.zplanes = [], [], []
        for array, spacing in volumes.values():
            v = torch.from_numpy((array - intensity["mean"]) / intensity["std"]).to(device)
            z = v.shape[-1]
            keep = [k for k in range(z) if k % HOLD_OUT_EVERY != HOLD_OUT_EVERY // 2]
            self.slices.append(v[..., keep])
            self.holdout.append(v[..., [k for k in range(z) if k not in keep]])
            inplane = (spacing[0] + spacing[1]) / 2
            if zpairs and abs(spacing[2] - inplane) <= ISOTROPIC_TOLERANCE * inplane:
                self.zplanes.append(v)
        self.weights = [s.shape[0] * s.shape[1] * s.shape[2] for s in self.slices]

    def batch(self, planes: int, size: int, scale: float) -> torch.Tensor:
        """(planes, 1, P, P, 1) random crops of axial slices, P about ``size / scale`` (before the
        iteration resamples them by ``scale``), randomly flipped and transposed."""
        source = random.choices(self.slices, self.weights)[0]
        x, y, z = source.shape
        p = min(int(round(size / scale)), x, y)
        xs = torch.randint(0, x - p + 1, (planes,)).tolist()
        ys = torch.randint(0, y - p + 1, (planes,)).tolist()
        zs = torch.randint(0, z, (planes,)).tolist()
        crops = torch.stack([source[a : a + p, b : b + p, c] for a, b, c in zip(xs, ys, zs)])
        if random.random() < 0.5:
            crops = crops.flip(1)
        if random.random() < 0.5:
            crops = crops.flip(2)
        if random.random() < 0.5:
            crops = crops.transpose(1, 2)
        return crops[:, None, :, :, None].contiguous()

    def zplane_batch(self, planes: int, size: int) -> torch.Tensor | None:
        """(planes, 1, P, Pz) coronal/sagittal crops of a near-isotropic volume, z last."""
        if not self.zplanes:
            return None
        v = random.choice(self.zplanes)
        if random.random() < 0.5:
            v = v.transpose(0, 1)  # sagittal planes instead of coronal
        x, y, z = v.shape
        p, pz = min(size, x), min(size, z)
        xs = torch.randint(0, x - p + 1, (planes,)).tolist()
        ys = torch.randint(0, y, (planes,)).tolist()
        zs = torch.randint(0, z - pz + 1, (planes,)).tolist()
        return torch.stack([v[a : a + p, b, c : c + pz] for a, b, c in zip(xs, ys, zs)])[:, None].contiguous()

    def validation_pairs(self, factor: int, profile: str, size: int = 96):
        """Centre crops of every held-out slice, degraded along y and along x: (low, target) lists."""
        pairs = []
        for held in self.holdout:
            x, y, z = held.shape
            p = min(size, x, y)
            a, b = (x - p) // 2, (y - p) // 2
            planes = held[a : a + p, b : b + p].permute(2, 0, 1)[:, None]
            for transpose in (False, True):
                pairs.append(scripts.degradation.inplane_pair(planes, factor, profile, transpose=transpose))
        return pairs


def psnr(pred: torch.Tensor, target: torch.Tensor, factor: int, data_range: float) -> float:
    """PSNR on the synthesized columns only (the known ones are exact for both)."""
    syn = torch.ones(target.shape[-1], dtype=torch.bool, device=target.device)
    syn[::factor] = False
    mse = float(((pred[..., syn] - target[..., syn]) ** 2).mean())
    return 10 * math.log10(data_range**2 / max(mse, 1e-12))


@torch.no_grad()
def validate(net, pairs, factor: int, data_range: float) -> tuple[float, float]:
    """(prior PSNR, linear PSNR) over the validation pairs, in standardised units."""
    net.eval()
    scores, linear = [], []
    for low, target in pairs:
        pred = net.coronal(low)[..., : target.shape[-1]]
        base = scripts.networks.han.linear_upsample_last(low, factor)[..., : target.shape[-1]]
        scores.append(psnr(pred, target, factor, data_range))
        linear.append(psnr(base, target, factor, data_range))
    net.train()
    return float(np.mean(scores)), float(np.mean(linear))


def pretrain(args: argparse.Namespace, factor: int, volumes: dict, device: torch.device, out: Path) -> dict:
    torch.manual_seed(args.seed + factor)
    random.seed(args.seed + factor)
    intensity = intensity_statistics(volumes)
    preset = PRESETS[args.preset]
    method = {"views": ["c", "s"], "fusion": "mean_cs", "inplane_pairs": True, "internal_pairs": False}
    net = build_network(factor, preset, method)
    window = [
        (intensity["clip_low"] - intensity["mean"]) / intensity["std"],
        (intensity["clip_high"] - intensity["mean"]) / intensity["std"],
    ]
    net.coronal.input_window = tuple(window)
    if args.init_from is not None:  # continue an earlier prior (a fresh optimizer and schedule)
        net.load_state_dict(
            torch.load(args.init_from / f"prior_x{factor}.pt", map_location="cpu", weights_only=True)
        )
        state_from = json.loads((args.init_from / f"prior_x{factor}.json").read_text())
        intensity = state_from["intensity"]
        window = [
            (intensity["clip_low"] - intensity["mean"]) / intensity["std"],
            (intensity["clip_high"] - intensity["mean"]) / intensity["std"],
        ]
        net.coronal.input_window = tuple(window)
    net = net.to(device)
    iteration = build_iteration(factor, 0, {**method, "slice_profile": args.slice_profile})
    lr = args.lr if args.lr is not None else preset.learning_rate
    optimizer = torch.optim.Adam(net.parameters(), lr)
    sampler = InplaneSampler(volumes, intensity, device, args.zpairs)
    pairs = sampler.validation_pairs(factor, args.slice_profile)
    data_range = window[1] - window[0]
    log_min, log_max = math.log(args.scale_range[0]), math.log(args.scale_range[1])
    budget_s = args.minutes * 60
    ckpt = out / f"prior_x{factor}.ckpt"
    state = {"iteration": 0, "elapsed": 0.0, "curve": [], "best": -1.0}
    if args.resume and ckpt.exists():
        saved = torch.load(ckpt, map_location=device, weights_only=False)
        net.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        print(f"x{factor}: resumed at iteration {state['iteration']} ({state['elapsed']:.0f} s)", flush=True)
    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    start = time.perf_counter() - state["elapsed"]
    next_val = state["elapsed"]
    net.train()
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= next_val or elapsed >= budget_s:
            score, linear = validate(net, pairs, factor, data_range)
            state["curve"].append(
                {
                    "iteration": state["iteration"],
                    "seconds": round(elapsed, 1),
                    "psnr": score,
                    "linear": linear,
                }
            )
            if score > state["best"]:
                state["best"] = score
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                write_prior(
                    args, factor, out, best_state, state, intensity, preset, method, sampler, volumes, device
                )
            print(
                f"x{factor} it {state['iteration']} {elapsed:.0f}s val PSNR {score:.3f} dB "
                f"(linear {linear:.3f}, +{score - linear:.3f})",
                flush=True,
            )
            state["elapsed"] = elapsed
            torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "state": state}, ckpt)
            next_val = elapsed + args.validate_every_s
            if elapsed >= budget_s:
                break
        # cosine learning rate over the time budget
        for group in optimizer.param_groups:
            group["lr"] = args.lr_min + 0.5 * (lr - args.lr_min) * (
                1 + math.cos(math.pi * elapsed / budget_s)
            )
        scale = math.exp(random.uniform(log_min, log_max))
        iteration.inplane_scale = scale
        volume = sampler.batch(args.planes, args.patch, scale)
        loss = iteration.planar_inplane(net, "c", volume) + iteration.planar_inplane(net, "s", volume)
        zplanes = sampler.zplane_batch(args.planes, args.patch) if args.zpairs else None
        if zplanes is not None:
            low, target = scripts.degradation.inplane_pair(zplanes, factor, args.slice_profile)
            loss = loss + iteration.internal_loss(net.coronal(low)[..., : target.shape[-1]], target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state["iteration"] += 1
    return write_prior(
        args, factor, out, best_state, state, intensity, preset, method, sampler, volumes, device
    )


def write_prior(
    args, factor, out, weights, state, intensity, preset, method, sampler, volumes, device
) -> dict:
    """``prior_x{r}.pt`` (the best weights so far) and ``prior_x{r}.json`` (its card), written at every
    validation that improves, so that a run stopped at any time leaves its best prior."""
    torch.save({k: v.cpu() for k, v in weights.items()}, out / f"prior_x{factor}.pt")
    best = max(state["curve"], key=lambda c: c["psnr"])
    card = {
        "factor": factor,
        "recipe": RECIPE,
        "method": method,
        "preset": args.preset,
        "architecture": {"axial": preset.axial, "planar": preset.planar},
        "intensity": intensity,
        "slice_profile": args.slice_profile,
        "scale_range": list(args.scale_range),
        "zpairs": bool(args.zpairs and sampler.zplanes),
        "data": {
            name: {"shape": list(v.shape), "spacing_mm": [round(s, 4) for s in sp]}
            for name, (v, sp) in volumes.items()
        },
        "left_out": list(args.leave_out),
        "data_licence": DATA_LICENCE,
        "iterations": state["iteration"],
        "seconds": round(state["elapsed"], 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "validation": {
            "what": "held-out axial slices (every 8th), in-plane pairs at scale 1, synthesized columns, "
            "standardised units over the intensity window",
            "best": best,
            "curve": state["curve"],
        },
        "command": "python benchmarks/pretrain.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "continued_from": previous_card(args, factor),
    }
    (out / f"prior_x{factor}.json").write_text(json.dumps(card, indent=1) + "\n")
    return card


def previous_card(args, factor: int) -> dict | None:
    """The card of the prior this run continued (``--init_from``), without its curve."""
    if args.init_from is None:
        return None
    card = json.loads((args.init_from / f"prior_x{factor}.json").read_text())
    card["validation"] = {"best": card["validation"]["best"]}
    return card


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding the shared CT volumes")
    parser.add_argument("--factors", nargs="+", type=int, default=[2, 3, 4, 5, 6])
    parser.add_argument("--minutes", type=float, default=60.0, help="training time per factor")
    parser.add_argument(
        "--leave_out", nargs="*", default=[], help=f"volumes to leave out, of {list(VOLUMES)}"
    )
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument(
        "--planes", type=int, default=32, help="axial crops per step (each gives a c and an s pair)"
    )
    parser.add_argument("--patch", type=int, default=96, help="crop size after resampling (pixels)")
    parser.add_argument("--scale_range", nargs=2, type=float, default=[0.5, 1.25])
    parser.add_argument("--slice_profile", default="removal", choices=scripts.degradation.PROFILES)
    parser.add_argument("--zpairs", action="store_true", help="also train on the isotropic volumes' z-axis")
    parser.add_argument("--lr", type=float, default=None, help="Adam's starting rate (default: the preset's)")
    parser.add_argument("--lr_min", type=float, default=1e-5)
    parser.add_argument("--validate_every_s", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--init_from", type=Path, default=None, help="a folder of earlier priors to continue training from"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    volumes = load_volumes(args.data, args.leave_out)
    device = torch.device(args.device)
    for factor in args.factors:
        card = pretrain(args, factor, volumes, device, args.out)
        best = card["validation"]["best"]
        print(
            f"x{factor}: {card['iterations']} iterations in {card['seconds']:.0f} s; best validation PSNR "
            f"{best['psnr']:.3f} dB vs linear {best['linear']:.3f} (+{best['psnr'] - best['linear']:.3f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
