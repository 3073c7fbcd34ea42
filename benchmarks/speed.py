"""Prediction speed against the machine's own convolution roofline and linear interpolation.

    python benchmarks/speed.py                      # 512 x 512 x 100 and x 300 at x4, default plan
    python benchmarks/speed.py --slices 100         # one volume

In one process:
  1. the roofline probe: the attainable 3x3-convolution GFLOP/s of this machine, the best of
     several runs of a conv stack like the planar networks' (32 channels, channels-last, whole
     512-pixel planes; on CUDA under the planner's autocast);
  2. for each volume: a 512 x 512 x S int16 phantom at 0.7 x 0.7 x 2.8 mm (x4 -> 0.7 mm), the
     default plan (``icmd_auto plan``, the planner's preset and plane chunk for this machine) and a
     one-iteration training (weights change neither time nor memory), then the whole
     ``icmd_auto predict`` command as a user runs it, its stderr on a pseudo-terminal (the progress
     bar shows): wall time, peak RSS (the child's rusage), output voxels/s, and the achieved
     convolution throughput (the plan's counted FLOPs per output voxel x output voxels / wall
     time) as a fraction of the roofline;
  3. linear interpolation along z on the same volume (scripts.evaluation.interpolate_z).
Prints the table and writes it into docs/PERFORMANCE.md (between markers) with the command.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import pty
import shlex
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import nibabel as nib  # noqa: E402

from icmd_auto.dataset import write_dataset_json  # noqa: E402
from icmd_auto.synthetic import ct_phantom_large, save_nifti  # noqa: E402
from icmd_auto.template import scripts  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import write_block  # noqa: E402

SPACING = (0.7, 0.7, 2.8)  # thick 2.8 mm slices -> factor 4 -> 0.7 mm, isotropic
FACTOR = 4


def icmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "icmd_auto", *args]


def run(cmd: list[str]) -> None:
    print("$ icmd_auto", " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True)


def roofline_gflops(device: torch.device, amp: str, repeats: int = 5) -> float:
    """Best GFLOP/s of an 8-layer 32-channel 3x3 conv stack on 512 x 100 planes (channels-last)."""
    torch.manual_seed(0)
    convs = torch.nn.Sequential(*[torch.nn.Conv2d(32, 32, 3, padding=1) for _ in range(8)]).eval()
    convs = convs.to(device, memory_format=torch.channels_last)
    planes = 8 if device.type == "cpu" else 256
    x = torch.randn(planes, 32, 512, 100, device=device).contiguous(memory_format=torch.channels_last)
    flops = 8 * 2 * 9 * 32 * 32 * x.shape[0] * x.shape[2] * x.shape[3]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    best = float("inf")
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for _ in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            convs(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


def on_a_terminal(cmd: list[str]) -> tuple[str, float, float]:
    """Run ``cmd`` with stderr on a 24 x 120 pseudo-terminal; returns (what it printed there, wall
    seconds, peak RSS in GiB of the child)."""
    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    start = time.perf_counter()
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
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    os.close(main)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"predict failed with exit code {os.waitstatus_to_exitcode(status)}")
    return b"".join(chunks).decode(errors="replace"), wall, usage.ru_maxrss / 2**20


def linear_seconds(volume: Path) -> float:
    thick = torch.from_numpy(np.asanyarray(nib.load(str(volume)).dataobj).astype(np.float32))
    start = time.perf_counter()
    scripts.evaluation.interpolate_z(thick, FACTOR, "linear")
    return time.perf_counter() - start


def measure(slices: int, root: Path, roofline: float, extra_plan: list[str]) -> dict:
    shape = (512, 512, slices)
    folder = root / f"512x512x{slices}"
    folder.mkdir(parents=True, exist_ok=True)
    volume = folder / f"ct_512x512x{slices}.nii.gz"
    if not volume.exists():
        print(f"making {volume} ...", flush=True)
        save_nifti(ct_phantom_large(shape, SPACING), SPACING, str(volume))
    dataset = write_dataset_json(folder / "dataset.json", [str(volume)], name=f"speed_{slices}")
    work = folder / "work"
    run(icmd("plan", "--dataset", str(dataset), "--work", str(work), "--epochs", "1", *extra_plan))
    run(icmd("train", "--work", str(work), "--epochs", "1", "--iterations_per_epoch", "1", "--quiet"))
    output = folder / "thin.nii.gz"
    cmd = icmd("predict", "--work", str(work), "--input", str(volume), "--output", str(output), "--overwrite")
    print("$ icmd_auto", " ".join(cmd[3:]), flush=True)
    load_before = os.getloadavg()[0]
    _, wall, rss = on_a_terminal(cmd)
    load_after = os.getloadavg()[0]
    plans = json.loads((work / "plans.json").read_text())
    out_shape = nib.load(str(output)).shape
    assert out_shape == (512, 512, (slices - 1) * FACTOR + 1), out_shape
    voxels = int(np.prod(out_shape))
    flops = float(plans["flops_per_output_voxel"]["value"]) * voxels
    linear = linear_seconds(volume)
    return {
        "volume": f"512x512x{slices}",
        "output_shape": list(out_shape),
        "preset": plans["preset"]["value"],
        "plane_inference": plans["plane_inference"]["value"],
        "flops_per_output_voxel": plans["flops_per_output_voxel"]["value"],
        "wall_s": wall,
        "peak_rss_gib": rss,
        "output_voxels_per_s": voxels / wall,
        "gflops": flops / wall / 1e9,
        "roofline_fraction": flops / wall / 1e9 / roofline,
        "linear_s": linear,
        "linear_voxels_per_s": voxels / linear,
        "load_average": [round(load_before, 2), round(load_after, 2)],
    }


def table(rows: list[dict], roofline: float, device: str) -> str:
    lines = [
        f"Roofline probe ({device}): **{roofline:.0f} GFLOP/s** attainable for 32-channel 3x3 convolutions.",
        "",
        "| volume (thick, x4) | output | preset, plane chunk, precision | wall (whole command) | peak RSS | "
        "output voxels/s | GFLOP/s (fraction of roofline) | linear interpolation | load average |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        inference = r["plane_inference"]
        lines.append(
            f"| {r['volume']} | {' x '.join(map(str, r['output_shape']))} | {r['preset']}, "
            f"{inference['plane_chunk']}, {inference.get('amp') or 'fp32'} | {r['wall_s']:.1f} s | "
            f"{r['peak_rss_gib']:.2f} GB | {r['output_voxels_per_s'] / 1e6:.2f} M | {r['gflops']:.0f} "
            f"({r['roofline_fraction']:.0%}) | {r['linear_s']:.2f} s ({r['linear_voxels_per_s'] / 1e6:.0f} M/s) | "
            f"{r['load_average'][0]:.1f} / {r['load_average'][1]:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", nargs="+", type=int, default=[100, 300])
    parser.add_argument("--work", type=Path, default=Path("/tmp/icmd_speed"))
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "PERFORMANCE.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument(
        "--preset", default=None, help="plan with this preset (default: the planner's choice)"
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = "bf16" if device.type == "cuda" else ""
    roofline = roofline_gflops(device, amp)
    name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{platform.processor() or 'CPU'}, {os.cpu_count()} cores"
    )
    print(f"roofline: {roofline:.0f} GFLOP/s ({name})", flush=True)
    rows = [
        measure(s, args.work, roofline, ["--preset", args.preset] if args.preset else []) for s in args.slices
    ]
    text = table(rows, roofline, name)
    command = "python benchmarks/speed.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text += f"\n\nCommand: `{command.strip()}` ({time.strftime('%Y-%m-%d')})."
    print(text)
    if args.json:
        args.json.write_text(
            json.dumps({"device": name, "roofline_gflops": roofline, "rows": rows}, indent=1)
        )
    key = ("cuda" if device.type == "cuda" else "cpu") + (f"_{args.preset}" if args.preset else "")
    write_block(args.out, f"<!-- speed:{key}:begin -->", f"<!-- speed:{key}:end -->", text)
    print(f"wrote the table into {args.out}")


if __name__ == "__main__":
    main()
