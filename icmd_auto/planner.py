"""Experiment planning: decisions from the fingerprint, each with its reason (nnU-Net's planners).

The plan is ``plans.json``: every entry is ``{"value": ..., "reason": "..."}`` so that a person
can read why each number was chosen, and edit it before generating the bundle again. Each
decision is logged as it is made (logger ``icmd_auto.planner``, one line, the reason after it).

This module decides; what it decides from lives apart: the fingerprint (fingerprint.py), the
measurements on this machine (plan_measurements.py, timing.py: counted FLOPs, timed probes) and
the memory model (plan_memory.py: bytes of training and prediction, the budget).

Decisions, in order:
    factor r            given (--factor, dataset.json factor / target_spacing_z) or from the
                        anisotropy: median z-spacing / median in-plane spacing, rounded, 2..6;
                        refused when the data is near-isotropic or a case is too short
    intensity window    the fingerprint's pooled 0.5 / 99.5 percentiles, mean and std
    preset              tiny (tests) / small (CPU) / paper (GPU): network widths and depths
    patch, batch        the largest that fit the memory budget (measured activation memory); on a
                        GPU the batch doubles while the measured samples/s grow (decide_device_batch)
    cache_on_device     the training volumes cached on the GPU where they fit (crops run there)
    amp, amp_dtype      SupervisedTrainer's mixed precision: on with CUDA, in bf16 where the GPU
                        has it; on a CPU only where a bf16 training-step probe is faster (decided
                        before the timing, which runs in the precision training will use)
    seconds/iteration   with a time budget: given (--seconds_per_iteration, e.g. the value an
                        earlier plans.json recorded) or measured on this machine: a training step
                        (timing.py: warm-up steps untimed, the median of synchronised steps, on
                        the training device) plus what a run spends around it, measured on the
                        bundle's own training workflow (data loading, handlers, checkpoints,
                        validation, reading the volumes); recorded with the machine and the raw
                        timings; the only decision that depends on its load
    threads             torch's CPU threads for training: the count the probe measured fastest
    schedule            epochs, iterations per epoch, distillation level starts; with a time
                        budget sized from the seconds per iteration, so that the cosine schedule
                        ends (its learning rate annealed) inside the budget
    validation          r thick slices held out at the end of every volume (when the volumes can
                        spare them) and the interval: as often as fits 3% of the training compute
    plane inference     planes per network call from the memory budget; inference precision
                        "auto": chosen by the bundle on the machine that predicts
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field

import torch

from . import plan_measurements as measure
from .errors import PlanningError
from .fingerprint import intensity_standardisation
from .plan_memory import (
    TRAIN_MEMORY_SAFETY,
    default_memory_gb,
    inference_memory_bytes,
    training_activation_bytes,
    training_memory_bytes,
    volume_cache_bytes,
)
from .prior import INITS, Prior, available, prior_for
from .template import scripts
from .timing import TIMED_STEPS, WARMUP_STEPS, machine_description, training_device

logger = logging.getLogger("icmd_auto.planner")

MIN_FACTOR, MAX_FACTOR = 2, 6
ANISOTROPY_MIN = 1.5  # below this, thick slices are not thick: nothing to synthesise
PATCH_XY_CANDIDATES = (256, 192, 128, 96, 64, 48, 32)  # multiples of 8 (G_a's bottleneck)
# without a GPU, and unless a preset or epochs are given, training is sized to this budget
# (the benchmark's per-volume budget, docs/RESULTS.md)
DEFAULT_CPU_BUDGET_MIN = 10.0
# of a time budget, the seconds before training starts (the child process's imports and configs)
# as the schedule counts them; what is measured beyond this (a slow start-up, reading and caching
# the volumes: training_costs) is spread over the iterations with the other costs
STARTUP_S = 10.0
# of a time budget, the share kept as a margin for the machine's load varying from the measurement's
BUDGET_MARGIN = 0.05


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
        {"width": 8, "groups": 1, "blocks": 1, "upsampler": "espcn"},
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
        {"width": 32, "groups": 2, "blocks": 2, "upsampler": "espcn"},
        64,
        4,
        20,
        50,
        8,
        1e-3,
        "for CPUs: minutes of training on 2 cores",
    ),
    "medium": Preset(
        "medium",
        {"width": 64, "groups": 2, "blocks": 2},
        {"width": 48, "groups": 3, "blocks": 3, "upsampler": "espcn"},
        96,
        8,
        50,
        100,
        16,
        5e-4,
        "for dataset-scale training: about 4x the small preset's FLOPs per voxel",
    ),
    "paper": Preset(
        "paper",
        {"width": 128, "groups": 3, "blocks": 4},
        {"width": 64, "groups": 4, "blocks": 6, "upsampler": "espcn"},
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
    # seconds per training iteration for a time budget (a plans.json's recorded value): no timing probe
    seconds_per_iteration: float | None = None
    method: dict = field(default_factory=dict)  # icmd#... overrides written into train.json, over the recipe
    init: str | None = None  # "prior" | "scratch"; None: the prior where it fits (decide_init)
    threads: int | None = None  # torch CPU threads for training; None: the timing probe's fastest count
    trains: bool = True  # False: the bundle only predicts (zero-shot), so training-only probes are skipped


# Method recipes: icmd#... values over the bundle's defaults (which are the paper's). The default
# is the one the benchmark record supports (RECIPE_EVIDENCE; docs/RESULTS.md discusses it): in the
# same wall-clock budget on 2 CPU cores, G_c/G_s trained on scale-matched in-plane pairs alone beat
# every configuration with the axial network and distillation; the axial network's internal pairs
# are at r x the target scale, and its iterations cost 4 to 5 x more.
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
# the rows of the benchmark record (docs/results.json: results[volume][factor][row]) that decide the
# default recipe, all trained for the same wall-clock time on 2 CPU cores; tests check the claim
RECIPE_EVIDENCE = {
    "record": "docs/results.json",
    "volume": "chest_1.5mm",
    "factor": 4,
    "default": "in-plane (the default recipe)",
    "paper": "seed: final",
    "closest": "seed, in-plane pairs instead of internal, N=1 [fusion mean_cs]",
    "others": "seed",  # the prefix of the paper's configuration and its ablations
}
DEFAULT_RECIPE_REASON = (
    f"measured ({RECIPE_EVIDENCE['record']}, {RECIPE_EVIDENCE['volume']} x{RECIPE_EVIDENCE['factor']}, every "
    f"row trained for the same wall-clock time on 2 CPU cores): row {RECIPE_EVIDENCE['default']!r} has a higher "
    f"synthesized-slice PSNR than row {RECIPE_EVIDENCE['paper']!r} (the paper's configuration, recipe icmd), "
    f"than row {RECIPE_EVIDENCE['closest']!r} (the paper's three networks on in-plane pairs "
    f"instead of internal ones, one distillation level) and than every other row whose name starts with {RECIPE_EVIDENCE['others']!r}"
)


def decision(value, reason: str) -> dict:
    return {"value": value, "reason": reason}


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


def build_network(factor: int, preset: Preset, method: dict | None = None, **kwargs) -> torch.nn.Module:
    """The network of a preset and a method (``icmd#...`` values over the bundle's defaults), built
    by the bundle's own ``ICMDNet.from_config``: the defaults live once, in the bundle."""
    icmd = {**(method or {}), "factor": factor}
    return scripts.networks.ICMDNet.from_config(
        icmd, {"axial": preset.axial, "planar": preset.planar}, **kwargs
    )


def build_iteration(factor: int, cmd_planes: int, method: dict | None = None):
    """The training iteration of a method, built by the bundle's ``ICMDIteration.from_config``."""
    return scripts.training.ICMDIteration.from_config(
        {**(method or {}), "factor": factor}, cmd_planes=cmd_planes
    )


def decide_patch_and_batch(
    net, iteration, preset: Preset, factor: int, min_shape: list[int], memory_gb: float, num_levels: int
) -> tuple[list[int], int, str, int]:
    """The largest patch (then batch up to the preset's) whose measured activation memory fits the
    budget, and the largest batch that would fit next to that patch (decide_device_batch's bound)."""
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
            need = training_memory_bytes(per_sample, ref_xy, xy, batch)
            if need <= budget:
                reason = (
                    f"largest of {list(fit_xy)} (preset max {preset.max_patch_xy}, smallest case "
                    f"{min_shape[0]}x{min_shape[1]}) x {pz} thick slices (2r+1, min 7) with batch {batch} whose "
                    f"measured training activations x{TRAIN_MEMORY_SAFETY:g} ({need / 2**30:.2f} GB) fit "
                    f"the {memory_gb:g} GB budget"
                )
                most = int(budget // training_memory_bytes(per_sample, ref_xy, xy, 1))
                return [xy, xy, pz], batch, reason, most
    xy = fit_xy[-1]
    need = training_memory_bytes(per_sample, ref_xy, xy, 1)
    raise PlanningError(
        f"the memory budget {memory_gb:g} GB is too small: the smallest patch ({xy}x{xy}x{pz}, batch 1) "
        f"needs about {need / 2**30:.2f} GB; raise --memory_gb or use --preset tiny"
    )


# On a GPU a small batch leaves the device idle between kernel launches: the batch doubles while a
# doubled batch trains at least GPU_BATCH_GAIN x the samples per second (measured) and fits.
GPU_BATCH_GAIN = 1.1
GPU_BATCH_MAX = 512
CACHE_DEVICE_SHARE = 0.1  # the cached training volumes may take this share of the GPU memory budget


def decide_device_batch(
    net, iteration, patch: list[int], batch: int, most: int, stage: int, memory_reason: str
) -> tuple[int, str]:
    """The batch on a GPU: from the memory decision's batch, doubled while the measured samples per
    second grow by GPU_BATCH_GAIN and the activations fit (``most``), at most GPU_BATCH_MAX."""
    device = training_device()
    rate = {}

    def samples_per_s(b: int) -> float:
        rate[b] = measure.samples_per_second(net, iteration, patch, b, stage, device)
        return rate[b]

    best = samples_per_s(batch)
    while batch * 2 <= min(most, GPU_BATCH_MAX):
        if samples_per_s(batch * 2) < GPU_BATCH_GAIN * best:
            break
        batch, best = batch * 2, rate[batch * 2]
    measured = ", ".join(f"batch {b}: {r:.0f}" for b, r in rate.items())
    return batch, (
        f"the GPU's batch: doubled from the memory decision's ({memory_reason}) while a doubled batch trained at "
        f"least {GPU_BATCH_GAIN:g} x the samples per second and fit ({most} fit, at most {GPU_BATCH_MAX}); measured "
        f"samples/s on {device}: {measured}. The learning rate is the preset's (Adam; not scaled with the batch)"
    )


def decide_cache_on_device(shapes: list, memory_gb: float) -> tuple[bool, str]:
    """Cache the training volumes on the GPU (random crops and flips run there) where they fit in
    CACHE_DEVICE_SHARE of the memory budget."""
    if not torch.cuda.is_available():
        return False, "no GPU: the volumes are cached in host memory"
    need = volume_cache_bytes(shapes)
    fits = need <= CACHE_DEVICE_SHARE * memory_gb * 2**30
    return fits, (
        f"the training volumes take {need / 2**30:.2f} GB as float32, "
        + (
            f"within {CACHE_DEVICE_SHARE:.0%} of the {memory_gb:g} GB budget: cached on the GPU, so random crops, "
            "flips and rotations run there and no batch crosses the bus"
            if fits
            else f"more than {CACHE_DEVICE_SHARE:.0%} of the {memory_gb:g} GB budget: cached in host memory"
        )
    )


def stage_weights(num_levels: int, start_fractions: tuple[float, ...]) -> list[float]:
    """The fraction of training each stage (active distillation levels 0..N) runs."""
    bounds = [0.0, *start_fractions[:num_levels], 1.0]
    return [max(bounds[i + 1] - bounds[i], 0.0) for i in range(num_levels + 1)]


def measure_step(
    net, iteration, patch, batch, options: PlanOptions, num_levels: int, start_fractions, amp: bool
) -> dict:
    """A training step's seconds, the stages weighted by the fraction of training each runs, at the
    fastest CPU thread count under the present load, in the precision training uses (``amp``).
    Stage ``num_levels`` is always timed: the run probe (training_run_costs) trains at it."""
    weights = stage_weights(num_levels, start_fractions)
    stages = sorted({s for s, w in enumerate(weights) if w > 0} | {num_levels})
    logger.info(
        "measuring: a training step (stages %s, %s) at %s CPU threads ...",
        stages,
        "bf16 autocast" if amp and not torch.cuda.is_available() else "amp" if amp else "float32",
        options.threads or "each candidate count of",
    )
    probe = measure.step_seconds(net, iteration, patch, batch, stages, amp, options.threads)
    per_stage = probe["per_stage"]
    timed = [s for s in per_stage if weights[s] > 0]
    probe["step"] = sum(weights[s] * per_stage[s] for s in timed) / sum(weights[s] for s in timed)
    return probe


def training_costs(step: dict, run: dict, num_levels: int, shapes: list, probe_shape: list) -> dict:
    """Seconds of a training run's parts, from the step probe and the run probe (one case):
    ``iteration`` the step plus what the real loop adds per iteration (data loading, handlers),
    ``epoch`` an epoch's end (checkpoint), ``validation`` one validation of all cases (the probe's
    scaled by their held-out area), ``load`` reading and caching all cases (scaled by voxels) and
    ``startup`` the training process's imports beyond the STARTUP_S the schedule counts."""
    area = lambda s: s[0] * s[1]  # noqa: E731
    voxels = lambda s: s[0] * s[1] * s[2]  # noqa: E731
    beyond = max(run["iteration"] - step["per_stage"][num_levels], 0.0)
    return {
        "step": step["step"],
        "beyond_step": beyond,
        "iteration": step["step"] + beyond,
        "epoch": run["epoch"],
        "validation": run["validation"] * sum(area(s) for s in shapes) / area(probe_shape),
        "load": run["load"] * sum(voxels(s) for s in shapes) / voxels(probe_shape),
        "startup": max(run["startup"] - STARTUP_S, 0.0),
    }


def run_seconds(costs: dict, epochs: int, iterations: int, validations: int) -> float:
    """Seconds of a training run after its start-up, from its parts (training_costs)."""
    return (
        costs["startup"]
        + costs["load"]
        + costs["iteration"] * iterations
        + costs["epoch"] * epochs
        + costs["validation"] * validations
    )


def seconds_per_iteration_decision(
    options: PlanOptions, step: dict | None, costs: dict | None, value: float
) -> dict:
    """plans.json's ``seconds_per_iteration``: the run's seconds per iteration with everything an
    epoch costs beyond the step spread over the iterations, recorded with the machine and every raw
    timing (or given); planning again with the value gives the same plan anywhere."""
    if step is None:
        return {"value": value, "machine": None, "reason": "given (--seconds_per_iteration): no timing probe"}
    threads = step["threads"] or 0
    on = (
        f"{step['device']}"
        if threads == 0
        else f"the CPU with {threads} thread{'s' * (threads > 1)}, the fastest of "
        f"{', '.join(step['timings'])} threads under this machine's present load"
    )
    stages = ", ".join(f"stage {s}: {t:.3g} s" for s, t in step["per_stage"].items())
    return {
        "value": value,
        "machine": machine_description(),
        "threads": threads,
        "costs": {k: round(v, 4) for k, v in costs.items()},
        "timings": {"warmup_steps": WARMUP_STEPS, "seconds": step["timings"]},
        "reason": (
            f"a training step {costs['step']:.3g} s (timing probe on {on}: median of {TIMED_STEPS} synchronised steps "
            f"after {WARMUP_STEPS} untimed warm-up steps; {stages}; the stages weighted by the fraction of training "
            f"each runs; every step's seconds in 'timings') + {costs['beyond_step']:.3g} s the real loop adds per "
            f"iteration (data loading, handlers) + per run {costs['startup']:.3g} s start-up beyond {STARTUP_S:g} s "
            f"and {costs['load']:.3g} s reading the volumes, "
            f"{costs['epoch']:.3g} s per epoch's end (checkpoint) and {costs['validation']:.3g} s per validation, "
            "spread over the iterations (measured on two short epochs of the bundle's own training workflow, "
            "'costs'); plan again with --seconds_per_iteration VALUE --threads N for the same plan without "
            "measuring (a busy machine measures more seconds and would plan fewer iterations)"
        ),
    }


def decide_threads(step: dict | None, options: PlanOptions) -> tuple[int, str]:
    """torch's CPU threads for training: given, else the timing probe's fastest count, else torch's default."""
    if options.threads is not None:
        if int(options.threads) < 1:
            raise PlanningError(f"--threads {options.threads}: must be at least 1")
        return int(options.threads), "given (--threads)"
    if step is None or not step.get("threads"):
        why = (
            "a GPU trains"
            if torch.cuda.is_available()
            else "no timing probe ran (no time budget, or a given --seconds_per_iteration)"
        )
        return 0, f"torch's default ({why})"
    return step["threads"], (
        "the thread count whose training step the timing probe measured fastest (see seconds_per_iteration): "
        "OpenMP threads that outnumber the free cores spin at barriers"
    )


def decide_schedule(
    preset: Preset,
    options: PlanOptions,
    num_levels: int,
    start_fractions: tuple[float, ...],
    step_seconds: float | None,
    lr_share: float = 1.0,
) -> tuple[dict, str]:
    """Epochs, iterations per epoch, level starts and the time limit (``step_seconds``: see
    seconds_per_iteration_decision; needed with a time budget). The learning rate, ``lr_share`` of
    the preset's (a warm start's: ``warm_start_lr_share``), follows a cosine over all planned
    iterations, so a run that trains them all ends annealed."""
    ipe = preset.iterations_per_epoch
    planned = None
    if options.time_budget_min is None:
        epochs = options.epochs or preset.epochs
        reason = f"preset {preset.name!r}: {epochs} epochs of {ipe} iterations"
        time_limit = 0
    else:
        budget_s = options.time_budget_min * 60
        usable = training_seconds(budget_s)
        iterations = max(int(usable / step_seconds), 1)
        # epochs of about the preset's length (of about 10 for short budgets), the iterations spread
        # over them: the whole count is trained, not its round-down to whole preset epochs
        epochs = max(round(iterations / ipe), 1) if iterations >= 2 * ipe else max(iterations // 10, 1)
        ipe = max(iterations // epochs, 1)
        time_limit = int(budget_s)
        planned = round(STARTUP_S + epochs * ipe * step_seconds, 1)
        reason = (
            f"time budget {options.time_budget_min:g} min, of which {STARTUP_S:g} s start-up and a "
            f"{BUDGET_MARGIN:.0%} margin: {step_seconds:.4g} s per iteration (see seconds_per_iteration: the step and "
            f"what an epoch costs beyond it) give {iterations} iterations in {usable:.0f} s of training -> {epochs} "
            f"epochs of {ipe}, planned to end after {planned:g} s with the cosine learning rate annealed; a "
            f"TimeLimit handler stops at {time_limit} s (the weights at the stop are validated too, see validation)"
        )
    level_start_epochs = [int(round(f * epochs)) for f in start_fractions[:num_levels]]
    value = {
        "epochs": epochs,
        "iterations_per_epoch": ipe,
        "level_start_epochs": level_start_epochs,
        "learning_rate": preset.learning_rate * lr_share,
        "time_limit_s": time_limit,
    }
    if planned is not None:
        value["planned_seconds"] = planned
    return value, reason + f"; distillation level n starts after {level_start_epochs} epochs"


def training_seconds(budget_s: float) -> float:
    """Of a time budget, the seconds training may take: less the start-up and the margin."""
    return max(budget_s * (1 - BUDGET_MARGIN) - STARTUP_S, budget_s * 0.5)


def validation_count(epochs: int, validation: dict) -> int:
    """Validations in a run: every ``interval`` epochs, and once more at the end when the last epoch
    was not validated (FinalValidation); none without held-out slices."""
    if not validation["holdout_slices"]:
        return 0
    interval = validation["interval"]
    return epochs // interval + (1 if epochs % interval else 0)


# Self-supervised validation (scripts/validation.py): the share of training compute it may take
# ("a few %"), and the bf16 guard for mixed precision on a CPU.
VALIDATION_SHARE = 0.03
AMP_MIN_SPEEDUP = 1.2  # bf16 autocast on a CPU must make a training step at least this much faster
AMP_LOSS_TOLERANCE = 0.01  # and give the same loss within this relative difference
AMP_PROBE_XY = 32  # in-plane size of the probe's patch (bf16 runs ~8x slower on CPUs without bf16 units)
AMP_PROBE_ROUNDS = 3


def decide_holdout(min_slices: int, factor: int) -> tuple[int, str]:
    """Thick slices held out at the end of every volume for validation: r, when the smallest case
    still keeps a full training patch (2r+1, min 7) without them; else none."""
    need = patch_slices(factor)
    if min_slices - factor >= need:
        return factor, (
            f"the last {factor} thick slices (r) of every volume never enter a training pair; G_c/G_s are validated "
            "on scale-matched in-plane pairs of them, G_a on the internal pair they form with the last training "
            f"slice (r is the fewest that fill one gap); the smallest case keeps {min_slices - factor} slices for "
            f"training, at least a patch's {need}"
        )
    return 0, (
        f"no validation: the smallest case has {min_slices} thick slices, too few to hold out r = {factor} and keep "
        f"a training patch of {need}; model.pt is the last weights"
    )


def validation_steps(
    net, iteration, validation, patch, batch, stage: int, shapes: list, holdout: int
) -> float:
    """One validation of every case's held-out slices in training steps: counted FLOPs over a step's."""
    largest = max(shapes, key=lambda s: s[0] * s[1])
    area = sum(s[0] * s[1] for s in shapes) / (largest[0] * largest[1])
    per_validation = measure.validation_flops(net, validation, [largest[0], largest[1], holdout + 1]) * area
    return per_validation / measure.training_step_flops(net, iteration, patch, batch, stage)


def decide_validation(
    net,
    iteration,
    validation,
    patch,
    batch,
    stage: int,
    shapes: list,
    holdout: int,
    holdout_reason: str,
    schedule: dict,
    steps: float | None = None,
) -> tuple[dict, str]:
    """How often to validate: as often as fits VALIDATION_SHARE of the training compute, at most every epoch.

    One validation's cost is counted in training steps (``steps``: validation_steps, counted here
    when not given), so the share holds for any time budget and machine.
    """
    if holdout == 0:
        return {"holdout_slices": 0, "interval": 1}, holdout_reason
    if steps is None:
        steps = validation_steps(net, iteration, validation, patch, batch, stage, shapes, holdout)
    epochs, iterations = schedule["epochs"], schedule["epochs"] * schedule["iterations_per_epoch"]
    count = max(1, min(epochs, int(VALIDATION_SHARE * iterations / steps)))
    interval = -(-epochs // count)
    count = epochs // interval
    reason = (
        f"{holdout_reason}. One validation of all {len(shapes)} case(s) costs {steps:.3g} training steps (counted "
        f"FLOPs); every {interval} epoch(s), {count} time(s) in the {epochs} epochs, is "
        f"{100 * count * steps / iterations:.2g}% of the {iterations} training steps (at most "
        f"{VALIDATION_SHARE:.0%}), and once more on the last weights if the last epoch was not validated. "
        "Key metric val_psnr (dB, synthesized positions, the evaluation's HU scale); model.pt is the best by it"
    )
    return {"holdout_slices": holdout, "interval": interval}, reason


def decide_amp_dtype(cuda: bool, bf16_supported: bool) -> tuple[str, str]:
    """The autocast dtype when amp is on: bf16 wherever the device has it, fp16 on older GPUs."""
    if not cuda:
        return "bfloat16", "CPU autocast computes in bf16"
    if bf16_supported:
        return "bfloat16", (
            "bf16 on CUDA, which has fp32's exponent range: measured on an H200 (docs/RESULTS.md, Mixed "
            "precision), fp16 autocast with the GradScaler gave NaN losses with the paper preset (the GPU "
            "preset) in both recipes, bf16 trained every preset and recipe, 1.06 to 1.79x faster than float32"
        )
    return "float16", "fp16 with SupervisedTrainer's GradScaler: this GPU has no bf16"


def decide_amp(net, iteration, patch: list[int], stage: int, cuda: bool) -> tuple[bool, str]:
    """SupervisedTrainer's ``amp``: on with CUDA; on a CPU (bf16 autocast) only where a training step
    is measured AMP_MIN_SPEEDUP x faster and its loss within AMP_LOSS_TOLERANCE of float32's."""
    if cuda:
        return True, "CUDA: autocast (tensor cores, half the activation memory), see amp_dtype"
    # a plain conv probe first (a fraction of a second): where bf16 convolutions are not faster, a
    # training step cannot be, and the step probe below (minutes where bf16 is slow) is skipped
    fp32_conv, bf16_conv = measure.conv_probe_seconds(None), measure.conv_probe_seconds(torch.bfloat16)
    if bf16_conv * AMP_MIN_SPEEDUP > fp32_conv:
        return False, (
            f"float32: a 3x3-conv probe ran in {bf16_conv * 1e3:.0f} ms with bf16 autocast against "
            f"{fp32_conv * 1e3:.0f} ms in float32 on this CPU (this CPU has no fast bf16 convolutions). "
            "On CUDA the bundle's default is on"
        )
    probe = [min(patch[0], AMP_PROBE_XY), min(patch[1], AMP_PROBE_XY), patch[2]]  # the ratio is what counts
    logger.info("measuring: a training step in float32 and with bf16 autocast ...")
    timed = measure.precision_probe(net, iteration, probe, stage, AMP_PROBE_ROUNDS)
    fp32, bf16, difference = timed["fp32"], timed["bf16"], timed["loss_difference"]
    measured = (
        f"a training step (batch 1, patch {probe[0]}x{probe[1]}x{probe[2]}, best of {AMP_PROBE_ROUNDS}) took {bf16:.3g} s with bf16 autocast against {fp32:.3g} s in "
        f"float32 on this CPU ({fp32 / bf16:.2g}x), its loss differed by {difference:.2%}"
    )
    if bf16 * AMP_MIN_SPEEDUP <= fp32 and difference <= AMP_LOSS_TOLERANCE:
        return True, f"bf16 autocast: {measured}"
    return False, (
        f"float32: {measured}; bf16 needs {AMP_MIN_SPEEDUP:g}x and {AMP_LOSS_TOLERANCE:.0%} (this CPU has no fast "
        "bf16 convolutions). On CUDA the bundle's default is on"
    )


# the most planes per network call (fewer where the memory budget cannot hold them). The inferer
# measures, on the machine that predicts, which count up to this one (1, 2, 4, ...) and which memory
# layout run fastest (scripts.inferers.PlaneCallTuner): CPUs differ (an AVX2 EPYC, an AVX-512 EPYC
# and an AMX Xeon each preferred another; docs/PERFORMANCE.md), and large calls' fresh feature maps
# cost page faults in every element-wise op; a GPU needs more work per call
PLANE_CHUNK = 4
PLANE_CHUNK_GPU = 64


def decide_plane_inference(
    planar: dict, axial: dict | None, factor: int, max_shape: list[int], memory_gb: float, cuda: bool
) -> tuple[dict, str]:
    """The most planes per network call (PLANE_CHUNK, fewer only where the memory budget cannot hold
    them; the inferer measures which count up to it and which layout run fastest) and the inference
    precision.

    G_c / G_s run on whole coronal / sagittal planes and G_a on whole axial slice pairs, so
    nothing is computed twice and a plane's output never depends on the chunking.
    """
    x, y, z = (int(s) for s in max_shape)
    budget = memory_gb * 2**30
    fixed = inference_memory_bytes(max_shape, factor, 0, planar, axial)
    per_plane = inference_memory_bytes(max_shape, factor, 1, planar, axial) - fixed
    preferred = PLANE_CHUNK_GPU if cuda else PLANE_CHUNK
    chunk = min(int((budget - fixed) // per_plane), preferred)
    if chunk < 1:
        raise PlanningError(
            f"the memory budget {memory_gb:g} GB cannot hold the prediction of the largest case ({x}x{y}x"
            f"{(z - 1) * factor + 1} voxels out, about {(fixed + per_plane) / 2**30:.1f} GB with one plane at a "
            "time); raise --memory_gb"
        )
    need = fixed + chunk * per_plane
    fits = (
        f"at most {chunk} planes per network call"
        if chunk == preferred
        else f"at most {chunk} planes per network call, the most that fit (fewer than the usual {preferred})"
    )
    fits += (
        "; the inferer measures on the machine that predicts which count up to that and which memory layout "
        "(channels-last or contiguous) run fastest, and keeps the choice for the process (the output "
        "does not depend on the memory budget or the calls beyond float rounding)"
    )
    reason = (
        f"whole planes (no window overlap, nothing computed twice): {fits}; estimated peak {need / 2**30:.2f} GB "
        f"for the largest case ({x}x{y}x{z}) within "
        f"{memory_gb:g} GB (plus the process, about 0.7 GB); precision 'auto': chosen where the bundle predicts, "
        "at run time (bf16 autocast on CUDA; on a CPU only where it has bf16 instructions: CPUs differ, "
        "and an exported bundle must not keep the planning CPU's choice)"
    )
    return {"plane_chunk": chunk, "amp": "auto", "channels_last": True, "tune": True}, reason


def decide_inference_precision(cuda: bool) -> tuple[str, str]:
    """bf16 autocast on CUDA; on a CPU only where a probe finds it faster than float32 (for
    pretraining on this machine; a bundle decides its own at run time, ``amp: "auto"``)."""
    if cuda:
        return "bf16", (
            "bf16 autocast on CUDA (tensor cores); its synthesized-slice PSNR change is in docs/PERFORMANCE.md"
        )
    fp32, bf16 = measure.conv_probe_seconds(None), measure.conv_probe_seconds(torch.bfloat16)
    if bf16 < scripts.inferers.BF16_MAX_TIME_SHARE * fp32:
        return (
            "bf16",
            f"bf16 autocast: a 3x3-conv probe ran {fp32 / bf16:.1f}x faster than float32 on this CPU",
        )
    return "", (
        f"float32: bf16 autocast ran a 3x3-conv probe in {bf16 * 1e3:.0f} ms against {fp32 * 1e3:.0f} ms in float32 "
        "on this CPU (not faster)"
    )


# a fine-tune's learning rate as a share of the preset's, by factor: x1 measured first (docs/RESULTS_prior_cpu.md,
# chest x4, 3 CPU minutes, the 0.6-CPU-hour prior of 2026-12-01: x1 +1.36 dB over linear, x0.33 +1.30);
# with the 1.36-CPU-hour x4 prior x1 fell 0.20 dB below the untrained prior on the abdomen, x0.25 stayed
# within 0.02 of it and 0.04 below x1 on the chest (docs/RESULTS.md, "The fine-tuning rate at x4"). x2 keeps
# x1 (the fine-tune adds 0.44 and 0.61 dB to its prior); x3 too, measured: 3 CPU minutes on the held-out chest
# and abdomen, x1 +0.07 dB ahead of x0.25 on both ("The fine-tuning rate at x3"); x5 and x6, not measured, x1.
WARM_START_LR_SHARES = {4: 0.25}
WARM_START_LR_SHARE = 1.0


def warm_start_lr_share(factor: int) -> float:
    """The share of the preset's learning rate a warm start fine-tunes at, for ``factor``."""
    return WARM_START_LR_SHARES.get(factor, WARM_START_LR_SHARE)


# Training starts from the shipped prior where one fits the plan (warm start): on the leave-one-out
# volumes (docs/RESULTS.md, "Warm start or scratch") a warm start was ahead of training from scratch
# at 3 and 10 CPU minutes, x2 and x4, on every volume. Measured for the prior's own recipe only: the
# paper's recipe starts from scratch unless --init prior asks for it (its G_a has no prior).
DEFAULT_INIT_EVIDENCE = "docs/RESULTS.md, 'Warm start or scratch'"


# the names of ICMDNet's view networks in the paper
VIEW_NETWORKS = {"axial": "G_a", "coronal": "G_c", "sagittal": "G_s"}


def prior_misfit(prior: Prior | None, factor: int, recipe: str, method: dict, options: PlanOptions):
    """Why ``prior`` cannot start this plan's network (None where it can), and the view networks
    that would start fresh (those the prior does not hold: the ICMD recipe's G_a)."""
    if prior is None:
        shipped = sorted(available())
        return (
            f"no prior is shipped for x{factor} (shipped: {', '.join(f'x{r}' for r in shipped) or 'none'})",
            [],
        )
    if options.preset and options.preset != prior.preset:
        return f"--preset {options.preset} differs from the prior's preset {prior.preset!r}", []
    net = build_network(factor, PRESETS[prior.preset], method)
    try:
        fresh = net.load_prior(torch.load(prior.weights, map_location="cpu", weights_only=True))
    except (ValueError, RuntimeError) as err:  # RuntimeError: a tensor of another shape
        return f"recipe {recipe!r}: {str(err).splitlines()[0]}", []
    return None, [VIEW_NETWORKS.get(name, name) for name in fresh]


def decide_init(factor: int, recipe: str, method: dict, options: PlanOptions) -> tuple[Prior | None, str]:
    """Start training from the shipped prior (a warm start) or from scratch.

    The default: the prior where it fits the plan and was trained for the plan's recipe (the
    measured case, DEFAULT_INIT_EVIDENCE), else scratch. A prior fits where one is shipped for the
    factor, no other preset was asked for and the method's network holds the prior's view networks
    whole (``ICMDNet.load_prior``: the ICMD recipe's G_a, which no prior holds, starts from scratch).
    ``--init prior`` with a misfit is an error; ``--init scratch`` is always taken.
    """
    if options.init not in (None, *INITS):
        raise PlanningError(f"unknown init {options.init!r}; choose one of {list(INITS)}")
    if options.init == "scratch":
        return None, "given (--init scratch)"
    prior = prior_for(factor)
    misfit, fresh = prior_misfit(prior, factor, recipe, method, options)
    zero_shot = "; `icmd_auto predict` without --work uses the prior untrained (zero-shot)"
    if options.init is None:
        if misfit is None and recipe == prior.recipe:
            how = "the default: ahead of training from scratch on every leave-one-out volume measured"
        else:
            why = misfit or (
                f"a warm start was measured for the prior's recipe {prior.recipe!r}, not {recipe!r}"
                f" (--init prior asks for it)"
            )
            return None, f"from scratch: {why} ({DEFAULT_INIT_EVIDENCE})" + (zero_shot if prior else "")
    elif misfit:
        raise PlanningError(f"--init prior: {misfit}")
    else:
        how = "given (--init prior)"
    return prior, (
        f"warm start from the shipped prior {prior.describe()}"
        + (f" ({' and '.join(fresh)} from scratch: the prior holds no such network)" if fresh else "")
        + f"; {how} ({DEFAULT_INIT_EVIDENCE}). Training fine-tunes it at "
        f"{warm_start_lr_share(factor):.2g} x the preset's learning rate (measured: docs/RESULTS_prior_cpu.md and "
        f"docs/RESULTS.md, 'The fine-tuning rate at x4'), with the "
        "prior's intensity standardisation (its weights expect it); --init scratch trains from random weights"
        + zero_shot
    )


class Plan(dict):
    """plans.json's content as it is decided: every decision (``{"value", "reason"}``) set on it is
    logged at once, one line, the reason after it (its first clause; plans.json keeps it whole)."""

    def __setitem__(self, key: str, entry) -> None:
        super().__setitem__(key, entry)
        if isinstance(entry, dict) and "value" in entry and "reason" in entry:
            logger.info("%s: %s (%s)", key, _brief(entry["value"]), _brief_reason(entry["reason"]))


def _brief(value) -> str:
    text = str(value) if not isinstance(value, dict) else ", ".join(f"{k} {v}" for k, v in value.items())
    return text if len(text) <= 100 else text[:97] + "..."


def _brief_reason(reason: str) -> str:
    first = reason.split("; ")[0]
    return first if len(first) <= 160 else first[:157] + "..."


def probe_values(
    plan: dict, method: dict, preset: Preset, num_levels: int, case: dict, options: PlanOptions
) -> dict:
    """The config values the run probe (plan_measurements.training_run_costs) trains with: the plan's
    so far, on one case, every distillation level on from the start (the stage the step probe times)."""
    return {
        "icmd": {
            **method,
            "factor": plan["factor"]["value"],
            "level_start_epochs": [0] * num_levels,
            "cmd_planes": preset.cmd_planes,
        },
        "intensity": plan["intensity"]["value"],
        "architecture": {"axial": preset.axial, "planar": preset.planar},
        "patch_size": plan["patch_size"]["value"],
        "batch_size": plan["batch_size"]["value"],
        "learning_rate": preset.learning_rate,
        "validation": {"holdout_slices": plan["holdout"], "interval": 1},
        "amp": plan["amp"]["value"],
        "amp_dtype": plan["amp_dtype"]["value"],
        "cache_on_device": plan["cache_on_device"]["value"],
        "datalist": [case["image"]],
        "dicom_series": [case["series"]] if case.get("series") else None,
        "seed": options.seed,
    }


def plan_experiment(fingerprint: dict, options: PlanOptions) -> dict:
    """All decisions, as the content of plans.json (each logged as it is made)."""
    factor, factor_reason = decide_factor(fingerprint, options)
    check_slices(fingerprint, factor)  # refusals first: a refused plan says one line
    sx, sy, sz = fingerprint["median_spacing"]
    target_z = sz / factor
    intensity = fingerprint["intensity"]
    plan = Plan(dataset=fingerprint["dataset"])
    plan["factor"] = decision(factor, factor_reason)
    plan["target_spacing_z"] = decision(round(target_z, 6), f"median z-spacing {sz:.4g} mm / r")
    plan["slice_profile"] = decision(
        options.slice_profile or "removal",
        "given" if options.slice_profile else "the paper's protocol (keep every r-th slice)",
    )
    plan["intensity"] = decision(
        intensity_standardisation(intensity),
        "nnU-Net's CTNormalization statistics: the dataset's pooled 0.5/99.5 percentiles and the clipped "
        "mean/std (fingerprint.intensity_standardisation; bundle/docs/README.md, 'Intensity'). The window bounds "
        "what the networks' feature branches see; the image itself is not clipped (clip_image false), so bone "
        "and metal beyond the 99.5th percentile keep their HU instead of being cut (docs/RESULTS.md)",
    )
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
    prior, init_reason = decide_init(factor, recipe, method, options)
    options.init = "prior" if prior is not None else "scratch"
    plan["init"] = decision(
        {"mode": "prior" if prior else "scratch", "weights": str(prior.weights) if prior else None},
        init_reason,
    )
    if prior is not None:
        if preset.name != prior.preset:
            preset, preset_reason = PRESETS[prior.preset], f"the prior's preset (warm start); {preset_reason}"
        plan["intensity"] = decision(
            dict(prior.intensity),
            f"the prior's standardisation (warm start: its weights expect it), from {prior.weights.name}'s "
            "pretraining set (nnU-Net's CTNormalization statistics there)",
        )
    net = build_network(factor, preset, method)
    flops = measure.flops_per_output_voxel(net, factor)
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
    holdout, holdout_reason = decide_holdout(int(min_shape[2]), factor)
    train_shape = [min_shape[0], min_shape[1], min_shape[2] - holdout]  # what training sees
    patch, batch, patch_reason, most = decide_patch_and_batch(
        net, iteration, preset, factor, train_shape, memory_gb, num_levels
    )
    plan["patch_size"] = decision(patch, patch_reason)
    batch_reason = f"see patch_size: the largest batch up to the preset's {preset.batch_size} that fits next to that patch"
    if torch.cuda.is_available():
        batch, batch_reason = decide_device_batch(
            net, iteration, patch, batch, most, num_levels, batch_reason
        )
    plan["batch_size"] = decision(batch, batch_reason)
    plan["cache_on_device"] = decision(*decide_cache_on_device(shapes, memory_gb))
    plan["cmd_planes"] = decision(
        preset.cmd_planes,
        "coronal/sagittal planes per patch distilled per level "
        f"(preset {preset.name!r}), bounds the cost of level 2",
    )
    cuda = torch.cuda.is_available()
    # the precision first: the timing below measures the steps training will run
    if options.trains:
        plan["amp"] = decision(*decide_amp(net, iteration, patch, num_levels, cuda))
    else:  # zero-shot: the bundle predicts with the prior and is never trained; no training probes
        plan["amp"] = decision(cuda, "the bundle's default: the plan is for inference only (zero-shot)")
    plan["amp_dtype"] = decision(*decide_amp_dtype(cuda, cuda and torch.cuda.is_bf16_supported()))
    start_fractions = tuple(method.pop("level_start_fractions", (0.0, 0.0)))
    validation = scripts.validation.SelfSupervisedValidation(
        factor,
        method.get("fusion", "mean3"),
        intensity["mean"],
        intensity["std"],
        method["slice_profile"],
        method["inplane_scale"],
    )
    val_steps = None
    if options.trains and holdout:
        val_steps = validation_steps(net, iteration, validation, patch, batch, num_levels, shapes, holdout)

    def validation_for(schedule: dict) -> tuple[dict, str]:
        return decide_validation(
            net,
            iteration,
            validation,
            patch,
            batch,
            num_levels,
            shapes,
            holdout,
            holdout_reason,
            schedule,
            val_steps,
        )

    def validations_in(schedule: dict) -> int:
        return validation_count(schedule["epochs"], validation_for(schedule)[0])

    step_seconds, step = None, None
    if options.time_budget_min is not None:
        if options.seconds_per_iteration is not None:
            step_seconds = float(options.seconds_per_iteration)
            if not step_seconds > 0:
                raise PlanningError(
                    f"--seconds_per_iteration {step_seconds:g}: must be a positive number of seconds"
                )
            costs = None
        else:
            step = measure_step(
                net, iteration, patch, batch, options, num_levels, start_fractions, plan["amp"]["value"]
            )
            case = min(fingerprint["cases"], key=lambda c: c["shape"][0] * c["shape"][1] * c["shape"][2])
            logger.info(
                "measuring: two short epochs of the bundle's training on %s ...",
                os.path.basename(case["image"]),
            )
            run = measure.training_run_costs(
                probe_values({**plan, "holdout": holdout}, method, preset, num_levels, case, options),
                step["threads"],
            )
            costs = training_costs(step, run, num_levels, shapes, case["shape"])
            # the run's seconds per iteration: what an epoch costs beyond the step spread over the
            # iterations of the schedule it sizes (a fixed point: fewer iterations carry more of it)
            step_seconds = costs["iteration"] + costs["epoch"] / preset.iterations_per_epoch
            for _ in range(3):
                schedule, _ = decide_schedule(preset, options, num_levels, start_fractions, step_seconds)
                epochs, iterations = schedule["epochs"], schedule["epochs"] * schedule["iterations_per_epoch"]
                step_seconds = run_seconds(costs, epochs, iterations, validations_in(schedule)) / iterations
            step_seconds = float(f"{step_seconds:.4g}")
        plan["seconds_per_iteration"] = seconds_per_iteration_decision(options, step, costs, step_seconds)
    plan["threads"] = decision(*decide_threads(plan.get("seconds_per_iteration"), options))
    lr_share = warm_start_lr_share(factor) if options.init == "prior" else 1.0
    schedule, schedule_reason = decide_schedule(
        preset, options, num_levels, start_fractions, step_seconds, lr_share
    )
    plan["training"] = decision(schedule, schedule_reason)
    if options.trains:
        plan["validation"] = decision(*validation_for(schedule))
    else:
        plan["validation"] = decision(
            {"holdout_slices": holdout, "interval": 1},
            f"{holdout_reason}; the interval is not sized: the plan is for inference only (zero-shot)",
        )
    inference, inference_reason = decide_plane_inference(
        preset.planar,
        preset.axial if "a" in method.get("views", scripts.networks.VIEWS) else None,
        factor,
        max_shape,
        memory_gb,
        cuda,
    )
    plan["plane_inference"] = decision(inference, inference_reason)
    plan["method"] = decision(
        method,
        "icmd#... values that differ from the bundle's defaults "
        "(bundle/docs/README.md explains each switch and its default)",
    )
    plan["seed"] = decision(options.seed, "given" if options.seed else "default")
    plan["preset_values"] = asdict(preset)
    return dict(plan)
