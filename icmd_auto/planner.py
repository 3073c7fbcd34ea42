"""Experiment planning: decisions from the fingerprint, each with its reason (nnU-Net's planners).

The plan is ``plans.json``: every entry is ``{"value": ..., "reason": "..."}`` so that a person
can read why each number was chosen, and edit it before generating the bundle again.

Decisions, in order:
    factor r            given (--factor, dataset.json factor / target_spacing_z) or from the
                        anisotropy: median z-spacing / median in-plane spacing, rounded, 2..6;
                        refused when the data is near-isotropic or a case is too short
    intensity window    the fingerprint's pooled 0.5 / 99.5 percentiles, mean and std
    preset              tiny (tests) / small (CPU) / paper (GPU): network widths and depths
    patch, batch        the largest that fit the memory budget (measured activation memory)
    schedule            epochs, iterations per epoch, distillation level starts; with a time
                        budget sized from a timing probe on this machine
    sliding window      inference window and plane chunk from the memory budget
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import torch

from .errors import PlanningError
from .template import scripts

MIN_FACTOR, MAX_FACTOR = 2, 6
ANISOTROPY_MIN = 1.5  # below this, thick slices are not thick: nothing to synthesise
PATCH_XY_CANDIDATES = (256, 192, 128, 96, 64, 48, 32)  # multiples of 8 (G_a's bottleneck)
WINDOW_XY_CANDIDATES = (512, 384, 256, 192, 128, 96, 64)
TRAIN_MEMORY_SAFETY = 2.0  # measured autograd activations x this = the allowance (optimizer, allocator slack)
RAM_SHARE = 0.25  # default CPU memory budget: a quarter of the RAM
# without a GPU, and unless a preset or epochs are given, training is sized to this budget
# (the benchmark's per-volume budget, docs/RESULTS.md)
DEFAULT_CPU_BUDGET_MIN = 10.0


@dataclass(frozen=True)
class Preset:
    """Network size and the default schedule; small subclasses of a planner in nnU-Net's terms."""

    name: str
    axial: dict
    planar: dict
    max_patch_xy: int
    batch_size: int
    epochs: int
    iterations_per_epoch: int
    cmd_planes: int
    learning_rate: float
    description: str


PRESETS = {
    "tiny": Preset(
        "tiny",
        {"width": 16, "groups": 1, "blocks": 1},
        {"width": 8, "groups": 1, "blocks": 1},
        32,
        2,
        3,
        2,
        4,
        1e-3,
        "for tests: trains in seconds, learns little",
    ),
    "small": Preset(
        "small",
        {"width": 32, "groups": 1, "blocks": 2},
        {"width": 32, "groups": 2, "blocks": 2},
        64,
        4,
        20,
        50,
        8,
        1e-3,
        "for CPUs: minutes of training on 2 cores",
    ),
    "paper": Preset(
        "paper",
        {"width": 128, "groups": 3, "blocks": 4},
        {"width": 64, "groups": 4, "blocks": 6},
        128,
        8,
        100,
        200,
        32,
        2e-4,
        "for GPUs: closer to the reference networks' size",
    ),
}


@dataclass
class PlanOptions:
    """What the user may force; None means the planner decides."""

    factor: int | None = None
    target_spacing_z: float | None = None
    slice_profile: str | None = None
    preset: str | None = None
    time_budget_min: float | None = None
    memory_gb: float | None = None
    epochs: int | None = None
    seed: int = 0
    recipe: str | None = None  # a key of RECIPES; None: DEFAULT_RECIPE
    method: dict = field(default_factory=dict)  # icmd#... overrides written into train.json, over the recipe


# Method recipes: icmd#... values over the bundle's defaults (which are the paper's). The default
# is the one the benchmark supports (docs/RESULTS.md): in the same wall-clock budget on 2 CPU
# cores, G_c/G_s trained on scale-matched in-plane pairs alone beat every configuration with the
# axial network and distillation (chest CT, x4, 3 min: +1.24 dB over linear; the paper's
# configuration -0.82 dB; with in-plane pairs and one distillation level +0.96 dB with the c/s
# mean): the axial network's internal pairs are at r x the target scale, and its iterations cost
# 4 to 5 x more.
RECIPES = {
    "inplane": {
        "views": ["c", "s"],
        "fusion": "mean_cs",
        "internal_pairs": False,
        "inplane_pairs": True,
        "use_memory": False,
        "lambda_cmd": 0.0,
        "lambda_mem": 0.0,
    },
    "icmd": {},
}
RECIPE_DESCRIPTIONS = {
    "inplane": "G_c/G_s trained on scale-matched in-plane pairs, coronal/sagittal mean (no axial network, "
    "no distillation)",
    "icmd": "the paper's ICMD: G_a, G_c, G_s on internal pairs, memory bank, two distillation levels, "
    "three-view mean",
}
DEFAULT_RECIPE = "inplane"
DEFAULT_RECIPE_REASON = (
    "measured (docs/RESULTS.md, chest CT x4, same 3-min CPU budget, synthesized-slice PSNR over linear): "
    "inplane +1.24 dB, icmd -0.82 dB, icmd with in-plane pairs and one level +0.96 dB (c/s mean)"
)


def decision(value, reason: str) -> dict:
    return {"value": value, "reason": reason}


def default_memory_gb() -> tuple[float, str]:
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        return round(total * 0.9, 1), f"90% of the GPU's {total:.1f} GB"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return round(ram * RAM_SHARE, 1), f"{int(RAM_SHARE * 100)}% of this machine's {ram:.1f} GB RAM (no GPU)"


def decide_factor(fingerprint: dict, options: PlanOptions) -> tuple[int, str]:
    sx, sy, sz = fingerprint["median_spacing"]
    inplane = (sx + sy) / 2
    if options.factor is not None:
        return int(options.factor), "given (--factor or dataset.json 'factor')"
    if options.target_spacing_z is not None:
        r = round(sz / options.target_spacing_z)
        if r < MIN_FACTOR:
            raise PlanningError(
                f"target_spacing_z {options.target_spacing_z} mm is not finer than the median slice spacing "
                f"{sz:.3g} mm by at least {MIN_FACTOR}x; nothing to synthesise"
            )
        clipped = min(max(r, MIN_FACTOR), MAX_FACTOR)
        return clipped, (
            f"median z-spacing {sz:.3g} mm / target_spacing_z {options.target_spacing_z:.3g} mm "
            f"= {sz / options.target_spacing_z:.2f}, rounded to {r}"
            + (f", clipped to {clipped}" if clipped != r else "")
        )
    anisotropy = sz / inplane
    if anisotropy < ANISOTROPY_MIN:
        raise PlanningError(
            f"the data is near-isotropic (median z-spacing {sz:.3g} mm / in-plane {inplane:.3g} mm = "
            f"{anisotropy:.2f} < {ANISOTROPY_MIN}): nothing to synthesise. To force a factor (e.g. to evaluate "
            f"on simulated thick slices), pass --factor R"
        )
    r = round(anisotropy)
    clipped = min(max(r, MIN_FACTOR), MAX_FACTOR)
    return clipped, (
        f"median z-spacing {sz:.3g} mm / median in-plane spacing {inplane:.3g} mm = {anisotropy:.2f}, "
        f"rounded to {r}" + (f", clipped to {clipped} ({MIN_FACTOR}..{MAX_FACTOR})" if clipped != r else "")
    )


def patch_slices(factor: int) -> int:
    """Thick slices per training patch: 2r+1 (two internal-learning gaps; the reference's 7 at x3,
    9 at x4), at least 7 (the reference's x2 crop)."""
    return max(2 * factor + 1, 7)


def check_slices(fingerprint: dict, factor: int) -> None:
    need = factor + 1
    short = [c for c in fingerprint["cases"] if c["shape"][2] < need]
    if short:
        names = ", ".join(f"{os.path.basename(c['image'])} ({c['shape'][2]} slices)" for c in short[:5])
        raise PlanningError(
            f"too few slices for factor {factor}: internal learning needs at least r+1 = {need} slices per case; "
            f"{names}. Use a smaller --factor or drop these cases"
        )


def build_network(factor: int, preset: Preset, method: dict | None = None) -> torch.nn.Module:
    method = method or {}
    return scripts.networks.ICMDNet(
        factor,
        views=method.get("views", scripts.networks.VIEWS),
        fusion=method.get("fusion", "mean3"),
        axial=preset.axial,
        planar=preset.planar,
        share_cs=method.get("share_cs", True),
        use_memory=method.get("use_memory", True),
        mem_items=method.get("mem_items", 10),
        axial_slices=method.get("axial_slices", 2),
    )


def build_iteration(factor: int, cmd_planes: int, method: dict | None = None):
    keys = (
        "num_levels",
        "lambda_cmd",
        "lambda_mem",
        "cmd_views",
        "cmd_detach",
        "pixel_loss",
        "use_wavelet",
        "wavelet",
        "wavelet_weight",
        "mem_margin",
        "mem_reduction",
        "slice_profile",
        "internal_pairs",
        "inplane_pairs",
        "inplane_scale",
        "internal_planes",
        "gamma",
    )
    kwargs = {k: v for k, v in (method or {}).items() if k in keys}
    return scripts.training.ICMDIteration(factor, cmd_planes=cmd_planes, **kwargs)


def flops_per_output_voxel(net: torch.nn.Module, factor: int) -> float:
    """Inference FLOPs per output voxel, counted by PyTorch's FlopCounterMode on a 64x64x8 volume."""
    from torch.utils.flop_counter import FlopCounterMode

    volume = torch.zeros(1, 1, 64, 64, 8)
    net.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(volume)
    return counter.get_total_flops() / (64 * 64 * ((8 - 1) * factor + 1))


def training_activation_bytes(net, iteration, patch: list[int], batch: int, stage: int) -> int:
    """Bytes autograd saves for one training step (measured with saved-tensor hooks)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.layout == torch.strided and t.device.type != "meta":  # dense tensors own a storage
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    volume = torch.zeros(batch, 1, *patch)
    net.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        terms = net(volume, objective=lambda n, v: iteration.losses(n, v, stage, iteration.gamma))
    del terms
    return sum(seen.values())


def decide_patch_and_batch(
    net, iteration, preset: Preset, factor: int, min_shape: list[int], memory_gb: float, num_levels: int
) -> tuple[list[int], int, str]:
    """The largest patch (then batch) whose measured activation memory fits the budget."""
    pz = min(patch_slices(factor), int(min_shape[2]))
    fit_xy = [c for c in PATCH_XY_CANDIDATES if c <= preset.max_patch_xy and c <= min(min_shape[:2])]
    if not fit_xy:  # volumes smaller than the smallest candidate: the largest multiple of 8 that fits
        fit_xy = [max(8, (int(min(min_shape[:2])) // 8) * 8)]
    # measure once at a small reference patch, scale by area and batch (activations are linear in both)
    ref_xy = min(fit_xy[-1], 32)
    per_sample = training_activation_bytes(net, iteration, [ref_xy, ref_xy, pz], 1, num_levels)
    budget = memory_gb * 2**30
    for xy in fit_xy:
        for batch in range(preset.batch_size, 0, -1):
            need = per_sample * (xy / ref_xy) ** 2 * batch * TRAIN_MEMORY_SAFETY
            if need <= budget:
                reason = (
                    f"largest of {list(fit_xy)} (preset max {preset.max_patch_xy}, smallest case "
                    f"{min_shape[0]}x{min_shape[1]}) x {pz} thick slices (2r+1, min 7) with batch {batch} whose "
                    f"measured training activations x{TRAIN_MEMORY_SAFETY:g} ({need / 2**30:.2f} GB) fit "
                    f"the {memory_gb:g} GB budget"
                )
                return [xy, xy, pz], batch, reason
    xy = fit_xy[-1]
    need = per_sample * (xy / ref_xy) ** 2 * TRAIN_MEMORY_SAFETY
    raise PlanningError(
        f"the memory budget {memory_gb:g} GB is too small: the smallest patch ({xy}x{xy}x{pz}, batch 1) "
        f"needs about {need / 2**30:.2f} GB; raise --memory_gb or use --preset tiny"
    )


def seconds_per_iteration(
    net, iteration, patch: list[int], batch: int, stage: int, repeats: int = 2
) -> float:
    """Wall time of a full training step (forward, backward, Adam) on this machine."""
    optimizer = torch.optim.Adam(net.parameters(), 1e-4)
    volume = torch.randn(batch, 1, *patch)
    net.train()
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        terms = net(volume, objective=lambda n, v: iteration.losses(n, v, stage, iteration.gamma))
        terms["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return min(times[1:])  # the first step pays one-off allocation costs


def decide_schedule(
    net,
    iteration,
    preset: Preset,
    patch,
    batch,
    options: PlanOptions,
    num_levels: int,
    start_fractions: tuple[float, ...],
) -> tuple[dict, str]:
    """Epochs, iterations per epoch, level starts and the time limit."""
    ipe = preset.iterations_per_epoch
    if options.time_budget_min is None:
        epochs = options.epochs or preset.epochs
        reason = f"preset {preset.name!r}: {epochs} epochs of {ipe} iterations"
        time_limit = 0
    else:
        budget_s = options.time_budget_min * 60
        # startup (imports, caching volumes) is not training time; keep a margin for it and the saves
        usable = max(budget_s * 0.9 - 20, budget_s * 0.5)
        # cost of each stage, weighted by the fraction of training it runs for
        per_stage = [seconds_per_iteration(net, iteration, patch, batch, s) for s in range(num_levels + 1)]
        bounds = [0.0, *start_fractions[:num_levels], 1.0]
        weights = [max(bounds[i + 1] - bounds[i], 0.0) for i in range(num_levels + 1)]
        mean_step = sum(w * t for w, t in zip(weights, per_stage)) / max(sum(weights), 1e-9)
        iterations = max(int(usable / mean_step), 1)
        epochs = max(iterations // ipe, 1) if iterations >= 2 * ipe else max(iterations // 10, 1)
        if epochs * ipe > iterations:
            ipe = max(iterations // epochs, 1)
        time_limit = int(budget_s)
        timing = ", ".join(f"stage {s}: {t:.2f} s" for s, t in enumerate(per_stage))
        reason = (
            f"time budget {options.time_budget_min:g} min: measured seconds per iteration ({timing}) on this "
            f"machine give {iterations} iterations in {usable:.0f} s of training -> {epochs} epochs of {ipe}; "
            f"a TimeLimit handler stops at {time_limit} s and the model at the stop is kept"
        )
    level_start_epochs = [int(round(f * epochs)) for f in start_fractions[:num_levels]]
    value = {
        "epochs": epochs,
        "iterations_per_epoch": ipe,
        "level_start_epochs": level_start_epochs,
        "learning_rate": preset.learning_rate,
        "time_limit_s": time_limit,
    }
    return value, reason + f"; distillation level n starts after {level_start_epochs} epochs"


# Peak memory of inference on the CPU, measured with the small preset (docs/PERFORMANCE.md). As for
# training, the budget is for the data: the process itself (torch, MONAI, the network) adds ~0.7 GB.
# window-sized float32 buffers alive at once (ICMDNet's view outputs and their sum, MONAI's weighted
# window and its weights): measured 6 to 9
WINDOW_OUTPUT_COPIES = 10
PLANE_FEATURE_MAPS = 4  # live G_c/G_s feature maps per pixel of the planes in one call (measured 3.2)
MAX_PLANE_CHUNK = 32  # planes per network call; larger calls are barely faster on a CPU
WINDOW_OVERLAP = 0.25


def inference_memory_bytes(
    shape: list[int], factor: int, window_xy: tuple[int, int], plane_chunk: int, planar_width: int
) -> float:
    """Estimated peak memory (beyond the process's own) of predicting a volume ``shape`` (X, Y, Z)
    with in-plane windows ``window_xy`` that span the whole z-range.

    The volume part: MONAI's sliding-window sum and count map, float32 at r x the slices, and
    the standardised input with its HU copy. The window part: WINDOW_OUTPUT_COPIES window
    outputs, and ``plane_chunk`` planes of G_c/G_s feature maps.
    """
    x, y, z = (int(s) for s in shape)
    z_out = z * factor
    wx, wy = window_xy
    volume = 8.0 * x * y * z_out + 8.0 * x * y * z
    window = 4.0 * wx * wy * z_out * WINDOW_OUTPUT_COPIES
    planes = 4.0 * plane_chunk * max(wx, wy) * z_out * planar_width * PLANE_FEATURE_MAPS
    return volume + window + planes


def window_count(size: int, window: int, overlap: float = WINDOW_OVERLAP) -> int:
    """How many windows MONAI's sliding-window inference places along an axis of ``size``."""
    from monai.data.utils import dense_patch_slices

    if window >= size:
        return 1
    interval = max(int(window * (1 - overlap)), 1)
    return len(dense_patch_slices((size,), (window,), (interval,)))


def decide_sliding_window(
    net_planar_width: int, factor: int, max_shape: list[int], memory_gb: float
) -> tuple[dict, str]:
    """Window (xy) and plane chunk: the least computation (windows overlap) within the memory budget.

    Windows span the whole z-range. Of the in-plane sizes whose estimated peak memory
    (inference_memory_bytes) fits the budget with at least 8 planes per network call, the one
    whose windows cover the least area in all is taken (overlapping windows compute their
    overlap twice), the larger window on a tie; the plane chunk is then as large as fits, up to
    MAX_PLANE_CHUNK.
    """
    x, y, z = (int(s) for s in max_shape)
    budget = memory_gb * 2**30
    options = []
    for wxy in WINDOW_XY_CANDIDATES:
        window = (min(wxy, x), min(wxy, y))
        fixed = inference_memory_bytes(max_shape, factor, window, 0, net_planar_width)
        per_plane = inference_memory_bytes(max_shape, factor, window, 1, net_planar_width) - fixed
        chunk = min(int((budget - fixed) // per_plane), MAX_PLANE_CHUNK)
        if chunk >= 1:
            area = window_count(x, window[0]) * window_count(y, window[1]) * window[0] * window[1]
            options.append((chunk < 8, area, -window[0] * window[1], window, chunk))
    if not options:
        need = inference_memory_bytes(max_shape, factor, (min(64, x), min(64, y)), 1, net_planar_width)
        raise PlanningError(
            f"the memory budget {memory_gb:g} GB cannot hold the prediction of the largest case ({x}x{y}x"
            f"{(z - 1) * factor + 1} voxels out, about {need / 2**30:.1f} GB with the smallest window); "
            "raise --memory_gb"
        )
    _, area, _, window, chunk = min(options)
    need = inference_memory_bytes(max_shape, factor, window, chunk, net_planar_width)
    windows = window_count(x, window[0]) * window_count(y, window[1])
    reason = (
        f"windows span the whole z-range (no window edge between known slices); {windows} window(s) of "
        f"{window[0]}x{window[1]} in-plane (overlap {WINDOW_OVERLAP:g}; {area / (x * y):.2f}x the image's area "
        f"computed, the least of the sizes that fit) with {chunk} planes per network call: estimated peak "
        f"{need / 2**30:.2f} GB for the largest case ({x}x{y}x{z}) within {memory_gb:g} GB (plus the process, about 0.7 GB)"
    )
    value = {"roi_size": [window[0], window[1], -1], "sw_batch_size": 1, "overlap": WINDOW_OVERLAP}
    return value | {"plane_chunk": chunk}, reason


def plan_experiment(fingerprint: dict, options: PlanOptions) -> dict:
    """All decisions, as the content of plans.json."""
    factor, factor_reason = decide_factor(fingerprint, options)
    check_slices(fingerprint, factor)
    sx, sy, sz = fingerprint["median_spacing"]
    target_z = sz / factor
    intensity = fingerprint["intensity"]
    plan: dict = {
        "dataset": fingerprint["dataset"],
        "factor": decision(factor, factor_reason),
        "target_spacing_z": decision(round(target_z, 6), f"median z-spacing {sz:.4g} mm / r"),
        "slice_profile": decision(
            options.slice_profile or "removal",
            "given" if options.slice_profile else "the paper's protocol (keep every r-th slice)",
        ),
        "intensity": decision(
            {
                "clip_low": intensity["p0.5"],
                "clip_high": intensity["p99.5"],
                "mean": intensity["mean"],
                "std": intensity["std"],
                "clip_image": False,
            },
            "nnU-Net's CTNormalization statistics: the dataset's pooled 0.5/99.5 percentiles and the clipped "
            "mean/std; raw HU in [0, 1] made a residual CNN collapse to the identity (DESIGN 3). The window bounds "
            "what the networks' feature branches see; the image itself is not clipped (clip_image false), so bone "
            "and metal beyond the 99.5th percentile keep their HU instead of being cut (docs/RESULTS.md)",
        ),
    }
    inplane = (sx + sy) / 2
    plan["inplane_scale"] = decision(
        round(inplane / target_z, 6),
        f"in-plane spacing {inplane:.4g} mm / target slice spacing {target_z:.4g} mm: in-plane pairs are resampled "
        f"by this so their pixel spacing equals the spacing G_c/G_s must produce along z",
    )
    if options.preset:
        if options.preset not in PRESETS:
            raise PlanningError(f"unknown preset {options.preset!r}; choose one of {sorted(PRESETS)}")
        preset, preset_reason = PRESETS[options.preset], "given (--preset)"
    elif torch.cuda.is_available():
        preset, preset_reason = PRESETS["paper"], "a CUDA GPU is present"
    else:
        preset, preset_reason = PRESETS["small"], "no GPU: the CPU preset"
        if options.time_budget_min is None and options.epochs is None:
            options.time_budget_min = DEFAULT_CPU_BUDGET_MIN
            preset_reason += f", trained to the default CPU time budget of {DEFAULT_CPU_BUDGET_MIN:g} min"
    recipe = options.recipe or DEFAULT_RECIPE
    if recipe not in RECIPES:
        raise PlanningError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    plan["recipe"] = decision(
        recipe,
        f"{RECIPE_DESCRIPTIONS[recipe]}; "
        + ("given (--recipe)" if options.recipe else f"the default: {DEFAULT_RECIPE_REASON}"),
    )
    method = {**RECIPES[recipe], **options.method}
    method.setdefault("inplane_scale", plan["inplane_scale"]["value"])
    method.setdefault("slice_profile", plan["slice_profile"]["value"])
    net = build_network(factor, preset, method)
    flops = flops_per_output_voxel(net, factor)
    plan["preset"] = decision(preset.name, f"{preset_reason}; {preset.description}")
    plan["architecture"] = decision(
        {"axial": preset.axial, "planar": preset.planar},
        f"preset {preset.name!r}: {sum(p.numel() for p in net.parameters()):,} parameters, "
        f"{flops / 1e3:.0f} kFLOP per output voxel at inference (counted)",
    )
    plan["flops_per_output_voxel"] = decision(
        round(flops), "torch FlopCounterMode on a 64x64x8 input, all views"
    )
    if options.memory_gb is not None:
        memory_gb, memory_reason = float(options.memory_gb), "given (--memory_gb)"
    else:
        memory_gb, memory_reason = default_memory_gb()
    plan["memory_gb"] = decision(memory_gb, memory_reason)
    shapes = [c["shape"] for c in fingerprint["cases"]]
    min_shape = [min(s[i] for s in shapes) for i in range(3)]
    max_shape = [max(s[i] for s in shapes) for i in range(3)]
    num_levels = int(method.get("num_levels", 2))
    iteration = build_iteration(factor, preset.cmd_planes, method)
    patch, batch, patch_reason = decide_patch_and_batch(
        net, iteration, preset, factor, min_shape, memory_gb, num_levels
    )
    plan["patch_size"] = decision(patch, patch_reason)
    plan["batch_size"] = decision(
        batch,
        "see patch_size: the largest batch up to the preset's "
        f"{preset.batch_size} that fits next to that patch",
    )
    plan["cmd_planes"] = decision(
        preset.cmd_planes,
        "coronal/sagittal planes per patch distilled per level "
        f"(preset {preset.name!r}), bounds the cost of level 2",
    )
    start_fractions = tuple(method.pop("level_start_fractions", (0.0, 0.0)))
    schedule, schedule_reason = decide_schedule(
        net, iteration, preset, patch, batch, options, num_levels, start_fractions
    )
    plan["training"] = decision(schedule, schedule_reason)
    window, window_reason = decide_sliding_window(preset.planar["width"], factor, max_shape, memory_gb)
    plan["sliding_window"] = decision(window, window_reason)
    plan["method"] = decision(
        method,
        "icmd#... values that differ from the bundle's defaults "
        "(bundle/docs/README.md explains each switch and its default)",
    )
    plan["seed"] = decision(options.seed, "given" if options.seed else "default")
    plan["preset_values"] = asdict(preset)
    return plan
