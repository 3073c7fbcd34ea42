"""Prediction speed against the machine's own convolution roofline and linear interpolation.

    python benchmarks/speed.py                      # 512 x 512 x 100 and x 300 at x4, default plan
    python benchmarks/speed.py --slices 100         # one volume
    python benchmarks/speed.py --slices 100 --zero_shot   # no --work: the shipped prior (plan included)

In one process:
  1. the roofline probe: the attainable 3x3-convolution GFLOP/s of this machine, the best of
     several runs of a conv stack like the planar networks' (32 channels, channels-last, whole
     512-pixel planes), in float32 and under bf16 (and on CUDA fp16) autocast: a row's fraction
     is of its plan's precision;
  2. for each volume: a 512 x 512 x S int16 phantom at 0.7 x 0.7 x 2.8 mm (x4 -> 0.7 mm), the
     default plan (``icmd_auto plan``, the planner's preset and plane chunk for this machine) and a
     one-iteration training (weights change neither time nor memory), then the whole
     ``icmd_auto predict`` command as a user runs it, its stderr on a pseudo-terminal (the progress
     bar shows): wall time, peak RSS (the child's rusage), output voxels/s, and the achieved
     convolution throughput (the plan's counted FLOPs per output voxel x output voxels / wall
     time) as a fraction of the roofline. With ``--zero_shot`` the command is the zero-shot
     ``icmd_auto predict --input ... --factor 4`` (no plan or training before it; the FLOPs are
     those of the plan it makes, planned again beside it);
  3. linear interpolation along z on the same volume (scripts.evaluation.interpolate_z).
The command runs under stages.py, which times its stages (read, input checks, zero-shot plan,
model load, synthesis, finalize, write, ...) in the same run.
Prints the tables and writes them into docs/PERFORMANCE.md (between markers) with the command.

    python benchmarks/speed.py --paired f87dc7d --slices 100 --fp32 --variations all

runs instead, paired on one input (a 512 x 512 x S phantom at x4), one after the other in the
order given and ``--repeats`` times: the zero-shot ``icmd_auto predict --factor 4`` of an older
commit (a ``git worktree`` of it under --work, run under this stages.py), and of this code with
each variation of the inference settings (VARIATIONS: planes per call, channels-last or not,
threads, the output path; the default row measures its own, PlaneCallTuner). ``--fp32`` forces
float32 inference in every row (the AVX2 case on a CPU whose bf16 is fast). The table, with the
CPU's model and flags (avx2, avx512, amx, bf16), goes into docs/PERFORMANCE.md.
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
    best = float("inf")
    with torch.inference_mode(), scripts.runtime.autocast(device, amp or None):
        for _ in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            convs(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


def on_a_terminal(cmd: list[str], env: dict | None = None) -> tuple[str, float, float]:
    """Run ``cmd`` with stderr on a 24 x 120 pseudo-terminal; returns (what it printed there, wall
    seconds, peak RSS in GiB of the child)."""
    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=terminal, env=env)
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


def measure(slices: int, root: Path, rooflines: dict, extra_plan: list[str], zero_shot: bool) -> dict:
    shape = (512, 512, slices)
    folder = root / f"512x512x{slices}"
    folder.mkdir(parents=True, exist_ok=True)
    volume = folder / f"ct_512x512x{slices}.nii.gz"
    if not volume.exists():
        print(f"making {volume} ...", flush=True)
        save_nifti(ct_phantom_large(shape, SPACING), SPACING, str(volume))
    dataset = write_dataset_json(folder / "dataset.json", [str(volume)], name=f"speed_{slices}")
    work = folder / ("zero_shot_plan" if zero_shot else "work")
    output = folder / "thin.nii.gz"
    args = ["predict", "--input", str(volume), "--output", str(output), "--overwrite"]
    if zero_shot:  # the plan the command makes for itself, made here to read its FLOPs
        zero_shot_plan = ["--factor", str(FACTOR), "--epochs", "1", "--init", "prior"]
        run(icmd("plan", "--dataset", str(dataset), "--work", str(work), *zero_shot_plan))
        args += ["--factor", str(FACTOR)]
    else:
        run(icmd("plan", "--dataset", str(dataset), "--work", str(work), "--epochs", "1", *extra_plan))
        run(icmd("train", "--work", str(work), "--epochs", "1", "--iterations_per_epoch", "1", "--quiet"))
        args += ["--work", str(work)]
    profile = folder / "stages.json"
    print("$ icmd_auto", " ".join(args), flush=True)
    load_before = os.getloadavg()[0]
    _, wall, rss = on_a_terminal(
        [sys.executable, str(Path(__file__).with_name("stages.py")), str(profile), *args]
    )
    load_after = os.getloadavg()[0]
    stages = json.loads(profile.read_text())
    plans = json.loads((work / "plans.json").read_text())
    thin = nib.load(str(output))
    out_shape = thin.shape
    assert out_shape == (512, 512, (slices - 1) * FACTOR + 1), out_shape
    voxels = int(np.prod(out_shape))
    flops = float(plans["flops_per_output_voxel"]["value"]) * voxels
    amp = plans["plane_inference"]["value"].get("amp")
    if amp == "auto":  # decided where the bundle runs: here, as the inferer decides it
        amp = scripts.inferers.run_time_precision(torch.device("cpu"))[0]
    roofline = rooflines[amp or "fp32"]  # at the precision the prediction ran in
    linear = linear_seconds(volume)
    return {
        "volume": f"512x512x{slices}",
        "command": "zero-shot" if zero_shot else "--work",
        "output_shape": list(out_shape),
        "output_dtype": str(thin.get_data_dtype()),
        "output_mb": output.stat().st_size / 1e6,
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
        "stages_s": {"process start and exit": wall - stages["total_s"], **stages["stages_s"]},
    }


def gzip_methods(threads: int) -> dict:
    """Ways to gzip a .nii: the standard library's zlib (nibabel's writer, level 1, and gzip's
    default 6), zlib-ng and python-isal (ISA-L) where installed, single and threaded."""
    import gzip

    methods = {
        "zlib level 1 (nibabel's default; the fallback)": lambda p: gzip.GzipFile(p, "wb", 1, mtime=0),
        "zlib level 6 (gzip's default)": lambda p: gzip.GzipFile(p, "wb", 6, mtime=0),
    }
    try:
        from zlib_ng import gzip_ng, gzip_ng_threaded

        methods["zlib-ng level 1"] = lambda p: gzip_ng.open(p, "wb", compresslevel=1)
        methods[f"zlib-ng level 1, {threads} threads"] = lambda p: gzip_ng_threaded.open(
            p, "wb", compresslevel=1, threads=threads
        )
    except ImportError:
        pass
    try:
        from isal import igzip, igzip_threaded

        for level in (0, 1, 2, 3):
            methods[f"isal level {level}"] = lambda p, level=level: igzip.open(p, "wb", compresslevel=level)
        methods[f"isal level 2, {threads} threads (NiftiWriter's)"] = lambda p: igzip_threaded.open(
            p, "wb", compresslevel=2, threads=threads
        )
    except ImportError:
        pass
    return methods


def gzip_table(nifti: Path, scratch: Path) -> str:
    """Write time, size and read time (the standard library's gzip, as nibabel reads) of the
    uncompressed bytes of ``nifti`` under each of ``gzip_methods``."""
    import gzip

    with gzip.open(nifti) as f:
        payload = f.read()
    image = nib.load(str(nifti))
    lines = [
        f"Compressing the output of the first row ({' x '.join(map(str, image.shape))} "
        f"{image.get_data_dtype()}, {len(payload) / 1e6:.0f} MB as .nii):",
        "",
        "| gzip | write | size | ratio | read (zlib) |",
        "|---|---|---|---|---|",
    ]
    target = scratch / "gzip_probe.nii.gz"
    for name, opener in gzip_methods(scripts.runtime.cpu_cores()).items():
        start = time.perf_counter()
        with opener(target) as f:
            f.write(payload)
        write = time.perf_counter() - start
        size = target.stat().st_size
        start = time.perf_counter()
        with gzip.open(target) as f:
            assert f.read() == payload, name
        read = time.perf_counter() - start
        lines.append(
            f"| {name} | {write:.2f} s | {size / 1e6:.0f} MB | {len(payload) / size:.2f} | {read:.2f} s |"
        )
        print(lines[-1], flush=True)
    target.unlink()
    return "\n".join(lines)


def table(rows: list[dict], rooflines: dict, device: str) -> str:
    lines = [
        f"Roofline probe ({device}): attainable GFLOP/s of 32-channel 3x3 convolutions "
        + ", ".join(f"**{g:.0f}** in {p}" for p, g in rooflines.items())
        + " (each row's fraction is of its plan's precision).",
        "",
        "| volume (thick, x4) | command | output | preset, plane chunk, precision | wall (whole command) | "
        "peak RSS | output voxels/s | GFLOP/s (fraction of roofline) | linear interpolation | load average |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        inference = r["plane_inference"]
        lines.append(
            f"| {r['volume']} | {r['command']} | {' x '.join(map(str, r['output_shape']))} {r['output_dtype']}, "
            f"{r['output_mb']:.0f} MB | {r['preset']}, "
            f"{inference['plane_chunk']}, {inference.get('amp') or 'fp32'} | {r['wall_s']:.1f} s | "
            f"{r['peak_rss_gib']:.2f} GB | {r['output_voxels_per_s'] / 1e6:.2f} M | {r['gflops']:.0f} "
            f"({r['roofline_fraction']:.0%}) | {r['linear_s']:.2f} s ({r['linear_voxels_per_s'] / 1e6:.0f} M/s) | "
            f"{r['load_average'][0]:.1f} / {r['load_average'][1]:.1f} |"
        )
    stages = list(rows[0]["stages_s"])
    lines += [
        "",
        "Where the time goes (seconds, exclusive; `benchmarks/stages.py`):",
        "",
        "| volume | " + " | ".join(stages) + " |",
        "|---|" + "---|" * len(stages),
    ]
    for r in rows:
        lines.append(
            f"| {r['volume']} ({r['command']}) | "
            + " | ".join(f"{r['stages_s'][s]:.2f}" for s in stages)
            + " |"
        )
    return "\n".join(lines)


# inference settings of the paired rows (stages.py's ICMD_STAGES_INFERER / ICMD_STAGES_THREADS)
VARIATIONS = {
    "default": ("measured per CPU (the plan's tune)", {}),
    "2cl": (
        "2 planes, channels-last (b4ccfb3's fixed plan)",
        {"inferer": {"plane_chunk": 2, "channels_last": True, "tune": False}},
    ),
    "2nchw": ("2 planes, contiguous", {"inferer": {"plane_chunk": 2, "channels_last": False, "tune": False}}),
    "1cl": ("1 plane, channels-last", {"inferer": {"plane_chunk": 1, "channels_last": True, "tune": False}}),
    "4cl": ("4 planes, channels-last", {"inferer": {"plane_chunk": 4, "channels_last": True, "tune": False}}),
    "8cl": ("8 planes, channels-last", {"inferer": {"plane_chunk": 8, "channels_last": True, "tune": False}}),
    "1thread": ("1 thread (measured per CPU)", {"threads": 1}),
    "nii": ("output .nii, no gzip (measured per CPU)", {"suffix": ".nii"}),
}
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu_description() -> str:
    """The CPU's model, cores and the flags that decide convolution kernels (from /proc/cpuinfo)."""
    model, flags = platform.processor() or "CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    have = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in CPU_FLAGS)
    capability = torch.backends.cpu.get_cpu_capability()
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    return (
        f"{model}, {scripts.runtime.cpu_cores()} cores; {have}; PyTorch {torch.__version__} kernels: {capability}"
        + (f" (ATEN_CPU_CAPABILITY={forced})" if forced else "")
    )


def old_checkout(commit: str, root: Path) -> Path:
    """A worktree of ``commit`` (made once) with the bundle template linked as an install would."""
    folder = root / f"code_{commit}"
    if not folder.exists():
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(folder), commit], check=True
        )
    link = folder / "icmd_auto" / "bundle_template"
    if not link.exists():
        link.symlink_to("../bundle")
    return folder


def paired_row(code: Path, label: str, variation: str, volume: Path, folder: Path, fp32: bool) -> dict:
    label_v, setting = VARIATIONS.get(variation, (variation, {}))
    inferer = dict(setting.get("inferer", {}))
    if fp32:
        inferer["amp"] = ""
    output = folder / f"thin{setting.get('suffix', '.nii.gz')}"
    profile = folder / "stages.json"
    env = {**os.environ, "PYTHONPATH": str(code), "ICMD_STAGES_INFERER": json.dumps(inferer)}
    env["ICMD_STAGES_THREADS"] = str(setting.get("threads", ""))
    args = [
        "predict",
        "--input",
        str(volume),
        "--output",
        str(output),
        "--overwrite",
        "--factor",
        str(FACTOR),
    ]
    print(f"$ [{label}, {variation}] icmd_auto {' '.join(args)}", flush=True)
    load = os.getloadavg()[0]
    _, wall, rss = on_a_terminal(
        [sys.executable, str(Path(__file__).with_name("stages.py")), str(profile), *args], env=env
    )
    stages = json.loads(profile.read_text())
    assert nib.load(str(output)).shape[2] == (nib.load(str(volume)).shape[2] - 1) * FACTOR + 1
    output.unlink()
    return {
        "code": label,
        "variation": label_v,
        "wall_s": wall,
        "peak_rss_gib": rss,
        "load_average": [round(load, 2), round(os.getloadavg()[0], 2)],
        "plane_calls": stages.get("plane_calls", []),
        "stages_s": {"process start and exit": wall - stages["total_s"], **stages["stages_s"]},
    }


def paired_table(rows: list[dict], cpu: str) -> str:
    stages = list(rows[0]["stages_s"])
    lines = [
        f"CPU: {cpu}.",
        "",
        "| code | inference setting | wall (whole command) | peak RSS | load average | "
        + " | ".join(stages)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(stages),
    ]
    for r in rows:
        chosen = "; ".join(
            f"chose {c['planes']} {'channels-last' if c['channels_last'] else 'contiguous'} of "
            + ", ".join(f"{k} {v:.0f}" for k, v in c["ms_per_plane"].items())
            + " ms/plane"
            for c in r["plane_calls"]
        )
        lines.append(
            f"| {r['code']} | {r['variation']}{' (' + chosen + ')' if chosen else ''} | {r['wall_s']:.1f} s | "
            f"{r['peak_rss_gib']:.2f} GB | {r['load_average'][0]:.1f} / {r['load_average'][1]:.1f} | "
            + " | ".join(f"{r['stages_s'].get(s, 0.0):.2f}" for s in stages)
            + " |"
        )
    return "\n".join(lines)


def paired(args) -> None:
    """The older commit and this code's variations on one input, one after the other."""
    slices = args.slices[0]
    folder = args.work / f"512x512x{slices}"
    folder.mkdir(parents=True, exist_ok=True)
    volume = folder / f"ct_512x512x{slices}.nii.gz"
    if not volume.exists():
        save_nifti(ct_phantom_large((512, 512, slices), SPACING), SPACING, str(volume))
    old = old_checkout(args.paired, args.work)
    variations = (
        list(VARIATIONS) if args.variations == ["all"] else args.variations or [next(iter(VARIATIONS))]
    )
    cpu = cpu_description()
    print(cpu, flush=True)
    rows = []
    for _ in range(args.repeats):
        rows.append(paired_row(old, args.paired, "its own plan", volume, folder, args.fp32))
        print(paired_table(rows[-1:], cpu), flush=True)
        for variation in variations:
            rows.append(paired_row(REPO, "this code", variation, volume, folder, args.fp32))
            print(paired_table(rows[-1:], cpu), flush=True)
    text = paired_table(rows, cpu)
    command = "python benchmarks/speed.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text += f"\n\nCommand: `{command.strip()}` ({time.strftime('%Y-%m-%d')})."
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=1))
    key = "cpu_paired" + ("_fp32" if args.fp32 else "")
    write_block(args.out, f"<!-- speed:{key}:begin -->", f"<!-- speed:{key}:end -->", text)
    print(f"wrote the table into {args.out}")


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
    parser.add_argument(
        "--zero_shot", action="store_true", help="predict without --work (the shipped prior), plan included"
    )
    parser.add_argument(
        "--gzip", action="store_true", help="also time gzip implementations on the first volume's output"
    )
    parser.add_argument(
        "--paired", metavar="COMMIT", help="run COMMIT's zero-shot predict and this code's, paired"
    )
    parser.add_argument(
        "--variations",
        nargs="+",
        help=f"with --paired: rows of this code, 'all' or of {', '.join(VARIATIONS)} (default: default)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="with --paired: rounds of all rows")
    parser.add_argument("--fp32", action="store_true", help="with --paired: float32 inference in every row")
    args = parser.parse_args()
    if args.paired:
        return paired(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precisions = ("fp32", "bf16", "fp16") if device.type == "cuda" else ("fp32", "bf16")
    rooflines = {p: roofline_gflops(device, "" if p == "fp32" else p) for p in precisions}
    name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{platform.processor() or 'CPU'}, {scripts.runtime.cpu_cores()} cores"
    )
    print(f"rooflines: {rooflines} GFLOP/s ({name})", flush=True)
    rows = [
        measure(s, args.work, rooflines, ["--preset", args.preset] if args.preset else [], args.zero_shot)
        for s in args.slices
    ]
    text = table(rows, rooflines, name)
    command = "python benchmarks/speed.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text += f"\n\nCommand: `{command.strip()}` ({time.strftime('%Y-%m-%d')})."
    print(text)
    if args.json:
        args.json.write_text(
            json.dumps({"device": name, "roofline_gflops": rooflines, "rows": rows}, indent=1)
        )
    key = (
        ("cuda" if device.type == "cuda" else "cpu")
        + (f"_{args.preset}" if args.preset else "")
        + ("_zero_shot" if args.zero_shot else "")
    )
    write_block(args.out, f"<!-- speed:{key}:begin -->", f"<!-- speed:{key}:end -->", text)
    print(f"wrote the table into {args.out}")
    if args.gzip:
        text = gzip_table(args.work / f"512x512x{args.slices[0]}" / "thin.nii.gz", args.work)
        text += f"\n\nCommand: `{command.strip()}` ({time.strftime('%Y-%m-%d')})."
        write_block(args.out, f"<!-- speed:{key}_gzip:begin -->", f"<!-- speed:{key}_gzip:end -->", text)


if __name__ == "__main__":
    main()
