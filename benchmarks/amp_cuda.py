"""Mixed precision on CUDA: the ICMD training iteration in float32, fp16 and bf16 autocast.

For each recipe (the planner's ``inplane`` and ``icmd``) and preset (``small``, the CPU preset,
and ``paper``, the GPU preset, at their batch and largest patch), the bundle's training iteration
runs as SupervisedTrainer calls it with ``amp`` off, with fp16 autocast and its GradScaler, and
with bf16 autocast (``amp_kwargs`` dtype), Adam 2e-4: 3 warm-up steps, then 20 timed steps on the
same random volumes. Recorded: seconds per step, the mean loss of the last 5 steps, whether every
loss was finite, the GradScaler's scale at the end, and how much the validation PSNR of the
weights changes when the validation runs under the same autocast.

    python benchmarks/amp_cuda.py [--json docs/results_amp_cuda.json]      # needs a CUDA GPU
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from monai.inferers import SimpleInferer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from icmd_auto.planner import PRESETS, RECIPES, build_iteration, build_network  # noqa: E402
from icmd_auto.template import scripts  # noqa: E402

FACTOR, SLICES, STEPS = 4, 9, 20
MODES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def psnr(out: dict) -> float:
    return float(10 * torch.log10(1 / ((out["pred"] - out["label"]) ** 2).mean()))


def run(recipe: str, preset_name: str, mode: str, device: torch.device) -> dict:
    preset, method = PRESETS[preset_name], {**RECIPES[recipe], "inplane_scale": 1.0}
    torch.manual_seed(0)
    net = build_network(FACTOR, preset, method).to(device)
    iteration = build_iteration(FACTOR, preset.cmd_planes, method)
    dtype = MODES[mode]
    engine = SimpleNamespace(
        state=SimpleNamespace(device=device, stage=2, gamma=0.25),
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), 2e-4),
        inferer=SimpleInferer(),
        amp=dtype is not None,
        amp_kwargs={"dtype": dtype} if dtype is not None else {},
        scaler=torch.amp.GradScaler("cuda") if dtype is not None else None,  # as SupervisedTrainer makes it
    )
    generator = torch.Generator(device=device).manual_seed(1)
    size = (preset.batch_size, 1, preset.max_patch_xy, preset.max_patch_xy, SLICES)
    volumes = [torch.randn(size, device=device, generator=generator) for _ in range(4)]
    for k in range(3):
        iteration(engine, {"image": volumes[k]})
    torch.cuda.synchronize()
    start = time.perf_counter()
    losses = [iteration(engine, {"image": volumes[k % 4]})["loss"] for k in range(STEPS)]
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / STEPS
    validation = scripts.validation.SelfSupervisedValidation(
        FACTOR, method.get("fusion", "mean3"), -350.0, 550.0
    )
    item = torch.randn(1, 1, 256, 256, FACTOR + 1, device=device, generator=generator)
    row = {
        "s_per_step": seconds,
        "loss_last5": sum(losses[-5:]) / 5,
        "finite": all(math.isfinite(v) for v in losses),
    }
    if dtype is not None:
        plain = validation(SimpleNamespace(state=engine.state, network=net, amp=False), {"image": item})
        mixed = validation(engine, {"image": item})
        row["grad_scale"] = engine.scaler.get_scale()
        row["validation_psnr_change_db"] = max(abs(psnr(a) - psnr(b)) for a, b in zip(plain, mixed))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", default=str(REPO / "docs" / "results_amp_cuda.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("amp_cuda.py needs a CUDA GPU")
    device = torch.device("cuda:0")
    rows = []
    for recipe in ("inplane", "icmd"):
        for preset in ("small", "paper"):
            row = {"recipe": recipe, "preset": preset}
            for mode in MODES:
                row[mode] = run(recipe, preset, mode, device)
            print(json.dumps(row), flush=True)
            rows.append(row)
    record = {
        "command": "python benchmarks/amp_cuda.py",
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "rows": rows,
    }
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
