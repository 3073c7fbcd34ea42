"""The `icmd_auto` command (python-fire over api.py).

Errors the user can fix print one line and exit 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import warnings
from pathlib import Path

import fire

# MONAI announces an optional GPU DICOM decoder it cannot find on every DICOM read; it falls
# back to pydicom's own decoders, which is what we use. Keep the user's terminal for our output.
warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)

from . import __version__, api  # noqa: E402
from .demo import run_demo  # noqa: E402
from .errors import ICMDError  # noqa: E402
from .prior import use_directory as use_prior_directory  # noqa: E402
from .report import format_report  # noqa: E402

KEEP_CHOICES = ("best", "last")  # icmd_auto pretrain --keep

logger = logging.getLogger("icmd_auto")


def _setup_logging(quiet: bool) -> None:
    """Our messages go to stderr, one line each, whatever logging set-up a bundle workflow applies
    to the root logger later (MONAI's ConfigWorkflow loads the bundle's logging.conf)."""
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr
    )


def plan(
    dataset: str,
    work: str,
    factor: int | None = None,
    target_spacing_z: float | None = None,
    slice_profile: str | None = None,
    preset: str | None = None,
    time_budget_min: float | None = None,
    memory_gb: float | None = None,
    epochs: int | None = None,
    seed: int = 0,
    recipe: str | None = None,
    series: str | None = None,
    seconds_per_iteration: float | None = None,
    init: str | None = None,
    threads: int | None = None,
    prior: str | None = None,
):
    """Check a dataset.json, fingerprint it, plan the experiment and generate WORK/bundle. --series UID takes that series from a DICOM folder holding several. With a time budget, --seconds_per_iteration S (e.g. the value an earlier plans.json recorded) replaces the timing probe, and --threads N the probe's choice of CPU threads: the same plan on any machine, busy or not. --init scratch|prior: training starts from random weights (the default) or from the shipped CT prior (warm start); --prior DIR takes the priors of DIR (a folder `icmd_auto pretrain` wrote) instead of the shipped ones."""
    if prior is not None:
        use_prior_directory(prior)
    plans = api.plan(
        dataset,
        work,
        series=_uids(series),
        factor=factor,
        target_spacing_z=target_spacing_z,
        slice_profile=slice_profile,
        preset=preset,
        time_budget_min=time_budget_min,
        memory_gb=memory_gb,
        epochs=epochs,
        seed=seed,
        recipe=recipe,
        seconds_per_iteration=seconds_per_iteration,
        init=init,
        threads=threads,
    )
    t = plans["training"]["value"]
    print(f"plan: factor {plans['factor']['value']} ({plans['factor']['reason']})")
    print(f"      recipe {plans['recipe']['value']} ({plans['recipe']['reason'].split(';')[0]})")
    print(f"      init {plans['init']['value']['mode']} ({plans['init']['reason'].split(';')[0]})")
    print(
        f"      preset {plans['preset']['value']}, patch {plans['patch_size']['value']} x batch "
        f"{plans['batch_size']['value']}, {t['epochs']} epochs x {t['iterations_per_epoch']} iterations"
    )
    if "seconds_per_iteration" in plans:
        step = plans["seconds_per_iteration"]
        where = f"measured on {step['machine']}" if step["machine"] else "given"
        threads = plans["threads"]["value"]
        print(f"      {step['value']:g} s per iteration ({where}), {threads or 'default'} CPU threads")
    print(
        f"wrote {os.path.join(work, 'fingerprint.json')}, {os.path.join(work, 'plans.json')}, "
        f"{os.path.join(work, 'bundle')}/"
    )


def train(work: str, restart: bool = False, **overrides):
    """Train WORK/bundle (resumes from the last checkpoint; --restart starts over). Extra --key value pairs override config keys, e.g. --icmd#gamma 0.5."""
    summary = api.train(work, restart=restart, quiet=_QUIET, **overrides)
    last = summary.get("last", {})
    terms = ", ".join(
        f"{k} {v:.4g}" for k, v in last.items() if k not in ("epoch", "iteration", "stage", "gamma")
    )
    print(
        f"trained in {summary['seconds']:.0f} s: epoch {last.get('epoch', '?')}, stage {last.get('stage', '?')}"
        + (f", {terms}" if terms else "")
        + f"\nmodel: {summary['model']}"
    )
    run = summary.get("run")
    if run:
        planned, real = run["planned"], run["real"]
        per = planned["seconds_per_iteration"]
        print(
            f"planned: {planned['epochs']} epochs, {planned['iterations']} iterations"
            + (f" in {planned['seconds']:.0f} s ({per:.4g} s per iteration)" if planned["seconds"] else "")
            + f"; trained: {real['epochs']} epochs, {real['iterations']} iterations in {real['seconds']:.0f} s"
            + (
                f" ({real['seconds_per_iteration']:.4g} s per iteration)"
                if real["seconds_per_iteration"]
                else ""
            )
            + " (plans.json 'runs')"
        )


def predict(
    input: str,
    output: str,
    work: str | None = None,
    factor: int | None = None,
    output_format: str = "nifti",
    overwrite: bool = False,
    resume: bool = False,
    preview: str | bool | None = None,
    series: str | None = None,
    prior: str | None = None,
    output_dtype: str = "auto",
    num_parts: int = 1,
    part_id: int = 0,
    **overrides,
):
    """Synthesise thin slices for a NIfTI file or DICOM series folder INPUT into OUTPUT (.nii.gz, or a series folder with --output_format dicom); for a folder of volumes or a dataset.json INPUT (a batch), into the folder OUTPUT, with a report (OUTPUT/predict_report.json and .csv) and a lock on OUTPUT; --resume does the cases that failed or were never finished; --num_parts N --part_id I (0..N-1) does the I-th of N shares of the sorted cases (a Slurm array), `icmd_auto report OUTPUT` merges the parts' reports. --preview PNG writes coronal/sagittal views before and after. --series UID takes that series from a DICOM folder holding several. Without --work, the shipped CT prior for the input's factor (--factor R, or its spacing) synthesises it: no plan, no training (zero-shot); --prior DIR takes the priors of DIR (a folder `icmd_auto pretrain` wrote) instead."""
    if prior is not None:
        use_prior_directory(prior)
    result = api.predict(
        work,
        input,
        output,
        factor=factor,
        overwrite=overwrite,
        resume=resume,
        quiet=_QUIET,
        output_format=output_format,
        preview=preview,
        series=_uids(series),
        **({"output_dtype": output_dtype} if output_dtype != "auto" else {}),
        num_parts=num_parts,
        part_id=part_id,
        **overrides,
    )
    if isinstance(result, dict):
        print(
            f"wrote {len(result['written'])} case(s) into {output}"
            + (f"; skipped {len(result['skipped'])} already done" if result["skipped"] else "")
            + f"; report: {result['report']}"
        )
    else:
        print(f"wrote {result}")


def report(out_dir: str):
    """Merge the batch reports in OUT_DIR (each part's of a split batch, and a whole batch's) into OUT_DIR/predict_report.json and .csv; exits 1 when a case failed or a part left no report."""
    merged = api.report(out_dir)
    counts = merged["counts"]
    path = Path(out_dir).expanduser().absolute() / "predict_report.json"
    print(
        f"{len(merged['cases'])} case(s) from {', '.join(merged['merged_from'])}: {counts['written']} written, "
        f"{counts['skipped']} skipped, {counts['failed']} failed; report: {path}"
    )
    problems = []
    if counts["failed"]:
        problems.append(f"{counts['failed']} case(s) failed")
    if merged["missing_parts"]:
        problems.append(f"no report from {', '.join(merged['missing_parts'])} (its cases never ran)")
    if problems:
        raise ICMDError(
            f"{'; '.join(problems)}; see {path}. Run the same predict with --resume to do what is left"
        )


def evaluate(work: str, dataset: str, out: str | None = None, series: str | None = None, **overrides):
    """Simulated-thick evaluation on the thin test images of DATASET: PSNR (all / synthesized) and SSIM_a/c/s vs interpolation. --series UID takes that series from a DICOM folder holding several."""
    report = api.evaluate(work, dataset, out=out, quiet=_QUIET, series=_uids(series), **overrides)
    print(format_report(report))


def export(
    work: str, out: str, torchscript: bool = False, report: str | None = None, overwrite: bool = False
):
    """Pack WORK/bundle into a model-zoo bundle archive OUT (.zip); --torchscript adds models/model.ts."""
    summary = api.export(work, out, torchscript=torchscript, report=report, overwrite=overwrite)
    print(
        f"wrote {summary['archive']} ({summary['files']} files, {summary['bytes'] / 2**20:.1f} MB); "
        "metadata verified against MONAI's bundle schema"
    )
    print(
        f"results table from {summary['report']}"
        if summary["report"]
        else "no evaluation report found: the model card says there are no measured results"
    )
    if summary["torchscript_input_shape"]:
        print(f"models/model.ts traced at input shape {summary['torchscript_input_shape']}")


def import_bundle(archive: str, work: str, overwrite: bool = False):
    """Unpack a shared bundle archive into WORK/bundle, ready for predict and evaluate."""
    bundle = api.import_bundle(archive, work, overwrite=overwrite)
    print(f"imported {archive} into {bundle}")


def demo(work: str = "icmd_demo", minutes: float = 3.0):
    """The built-in example: a synthetic CT phantom, then plan -> train -> predict -> evaluate in a few minutes.

    Args:
        work: the folder it writes: data/ (the phantom), bundle/, the prediction and evaluation.json.
        minutes: the training time budget in minutes; planning, prediction and evaluation add about a
            minute (--minutes 0.1 runs the whole pipeline fast, with little training).
    """
    run_demo(work, minutes=minutes, quiet=_QUIET)


def pretrain(
    out: str,
    factor: int,
    dataset: str | None = None,
    data_dir: str | list | None = None,
    hours: float | None = None,
    steps: int | None = None,
    stop_after: int | None = None,
    lease_minutes: float | None = None,
    resume: bool = False,
    init_from: str | None = None,
    reparam: bool = False,
    keep: str = "last",
    leave_out: str | list | None = None,
    skip_bad: bool = False,
    thin: bool = True,
    preset: str = "small",
    slice_profile: str = "removal",
    patch: int = 96,
    planes: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    bf16: bool | None = None,
    device: str | None = None,
    lr: float | None = None,
):
    """Pretrain a CT prior for factor R on an archive of scans (thick or thin; no thin ground truth) into the prior folder OUT (prior_xR.pt, its card prior_xR.json, the resume state prior_xR.ckpt), for `predict --prior OUT` and `plan --init prior --prior OUT`. Data: --dataset archive.json (a dataset.json; an entry may carry "licence" and "attribution") and/or --data_dir DIR (its NIfTI files and DICOM series folders, licences from its sources.json; several as --data_dir a,b). --hours H (default 1) becomes a step schedule from a timed probe (--steps N sets it directly); --stop_after N / --lease_minutes M end this run after N steps / M minutes (a lease); a checkpoint every minute, --resume continues exactly (and starts the run where OUT holds none yet). --lr: Adam's starting rate (default: the preset's), cosine to 1e-5. --init_from PRIOR_DIR continues another prior's weights (e.g. the shipped ones, icmd_auto/priors) on a new schedule. --thin (default on; --nothin off) adds thick-to-thin pairs along z of volumes with z-spacing <= 1.5 mm. A bad volume stops the run with one line per volume; --skip_bad leaves each out, named. --leave_out NAME[,NAME] (file name without .nii.gz) keeps volumes out of training and scores the run on them along their real z-axes (thickened by R), by which the card judges whether more hours, more data or a larger network is next. --keep last|best: prior_xR.pt holds the last step's weights (default) or those best by the held-out in-plane validation (a proxy that ranked continued runs wrongly twice; a finished run that kept its best takes --resume --keep last to write the last ones). --reparam trains the 3x3 convolutions re-parameterised (ECBSR-style branches summed into one kernel) and writes them folded: the preset's network at its speed. --preset: small | medium | paper; --slice_profile: removal | average."""
    from .pretrain import PretrainOptions, command_line
    from .pretrain import pretrain as run_pretrain

    dirs, left = _words(data_dir), _words(leave_out)
    opts = PretrainOptions(
        factor=int(factor),
        out=Path(out),
        hours=float(hours) if hours is not None else (None if steps else 1.0),
        steps=int(steps) if steps else None,
        stop_after=int(stop_after) if stop_after else None,
        lease_minutes=float(lease_minutes) if lease_minutes else None,
        lr=float(lr) if lr else None,
        dataset=Path(dataset) if dataset else None,
        data_dirs=[Path(d) for d in dirs],
        leave_out=[str(n) for n in left],
        skip_bad=skip_bad,
        thin=thin,
        preset=preset,
        slice_profile=slice_profile,
        patch=int(patch),
        planes=planes,
        seed=int(seed),
        threads=threads,
        bf16=bf16,
        device=device or ("cuda" if _cuda() else "cpu"),
        resume=resume,
        init_from=Path(init_from) if init_from else None,
        reparam=bool(reparam),
        keep=_keep(keep),
        command=command_line(sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "pretrain" else []),
    )
    card = run_pretrain(opts)
    best, last = card["validation"]["best"], card["validation"]["curve"][-1]
    left_out = (
        f", the left-out volumes along z {last['held_out_psnr']:.2f} vs {last['held_out_linear']:.2f} "
        f"({last['held_out_psnr'] - last['held_out_linear']:+.2f}) at the last step"
        if "held_out_psnr" in last
        else ""
    )
    print(
        f"wrote {Path(out) / f'prior_x{factor}.pt'}: {card['iterations']} of {card['schedule']['total_steps']} steps, "
        f"{card['cpu_hours']:.2f} CPU-hours; best validation PSNR {best['psnr']:.2f} dB vs linear {best['linear']:.2f} "
        f"({best['psnr'] - best['linear']:+.2f}){left_out}; {card['validation']['assessment']}"
    )


def _keep(value: str) -> str:
    if value not in KEEP_CHOICES:
        raise ICMDError(f"--keep must be one of {', '.join(KEEP_CHOICES)}, not {value!r}")
    return value


def _words(value) -> list[str]:
    """A list option as fire gives it: a list, or one string 'a,b' / '[a,b]' (fire keeps a list of
    bare names with dots as one string)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [w.strip() for w in str(value).strip("[]").split(",") if w.strip()]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def version():
    """Print the icmd_auto version."""
    print(__version__)


def _uids(series) -> list[str] | None:
    """--series as fire gives it: one UID or 'uid1,uid2' (a string), or a list "['uid1', 'uid2']"."""
    if series is None:
        return None
    if isinstance(series, bool):
        raise ICMDError("--series needs a SeriesInstanceUID")
    if isinstance(series, (int, float)):  # fire reads a UID like 1.23 as a number; a UID is text
        raise ICMDError(
            f"--series {series}: give the SeriesInstanceUID in quotes, e.g. --series '\"{series}\"'"
        )
    return [str(s) for s in series] if isinstance(series, (list, tuple)) else [str(series)]


def _choices(values) -> str:
    return " | ".join(str(v) for v in values)


def _option_help() -> dict[str, dict[str, str]]:
    """What each command's options do, with their choices and defaults: `--help` shows it (fire reads
    a docstring's ``Args:`` section). The choices come from where they are defined."""
    from .planner import DEFAULT_RECIPE, PRESETS, RECIPES
    from .predict import OUTPUT_FORMATS
    from .prior import INITS
    from .template import scripts

    profiles = _choices(scripts.degradation.PROFILES)
    prior = "a folder `icmd_auto pretrain` wrote, whose priors replace the shipped ones"
    series = "the SeriesInstanceUID to take from a DICOM folder that holds several series"
    overrides = "any config key of the bundle, e.g. --icmd#gamma 0.5 (an unknown key is refused)"
    return {
        "plan": {
            "dataset": "the dataset.json (MSD / nnU-Net form; paths relative to it)",
            "work": "the work folder: fingerprint.json, plans.json and bundle/ are written there",
            "factor": "the slice factor r, 2..6 (default: from the spacing, or dataset.json's 'factor')",
            "target_spacing_z": "the target slice spacing in mm, instead of --factor",
            "slice_profile": f"how thick slices are made from thin ones: {profiles} (default: removal, the paper's)",
            "preset": f"the network size: {_choices(PRESETS)} (default: small on a CPU, paper on a GPU)",
            "time_budget_min": "minutes training may take (default on a CPU without --preset/--epochs: 10); the "
            "schedule is sized to end inside it",
            "memory_gb": "the memory budget in GB (default: 90% of the GPU, else 25% of the RAM)",
            "epochs": "epochs to train, without a time budget (default: the preset's)",
            "seed": "the random seed (default 0)",
            "recipe": f"the method: {_choices(RECIPES)} (default: {DEFAULT_RECIPE}, the measured best)",
            "series": series,
            "seconds_per_iteration": "with a time budget: seconds per iteration instead of measuring them (the "
            "value an earlier plans.json recorded: the same plan on any machine)",
            "init": f"where training starts: {_choices(INITS)} (default: the shipped prior where one fits the plan: its factor, preset and recipe; else scratch)",
            "threads": "torch's CPU threads for training (default: the timing probe's fastest count)",
            "prior": prior,
        },
        "train": {
            "work": "the work folder `icmd_auto plan` wrote",
            "restart": "start over instead of resuming from the last checkpoint (default: resume)",
            "overrides": overrides,
        },
        "predict": {
            "input": "a NIfTI file, a DICOM series folder, a folder of volumes or a dataset.json",
            "output": "a .nii.gz file (or a DICOM series folder), or a folder for several inputs",
            "work": "the work folder of a trained bundle (default: none, the shipped prior, zero-shot)",
            "factor": "the slice factor r without --work (default: from the input's spacing)",
            "output_format": f"{_choices(OUTPUT_FORMATS)} (default: nifti)",
            "overwrite": "replace existing outputs (default: refuse)",
            "resume": "for several inputs: do only the cases that failed or were never finished, skip those "
            "written (default: off)",
            "preview": "write a PNG of coronal/sagittal views before and after (a path, or alone: beside the output)",
            "series": series,
            "prior": prior,
            "output_dtype": "the stored type of the output: auto (int16 where the input holds integer HU, "
            "else float32) or a numpy dtype such as int16 | float32 (default: auto)",
            "num_parts": "split a batch into this many parts, e.g. a Slurm array's size (default: 1)",
            "part_id": "which part this run does, 0 .. num_parts - 1: the sorted cases [part_id::num_parts] "
            "(default: 0)",
            "overrides": overrides,
        },
        "report": {
            "out_dir": "the output folder of a batch, holding its predict_report*.json",
        },
        "evaluate": {
            "work": "the work folder of a trained bundle",
            "dataset": "a dataset.json whose test images are thin CT (they are thickened for the protocol)",
            "out": "where the report is written (default: inside the work folder)",
            "series": series,
            "overrides": overrides,
        },
        "export": {
            "work": "the work folder of a trained bundle",
            "out": "the archive to write (.zip)",
            "torchscript": "also write models/model.ts (default: off)",
            "report": "the evaluation report whose table the model card shows (default: the latest)",
            "overwrite": "replace an existing archive (default: refuse)",
        },
        "import_bundle": {
            "archive": "a bundle archive (.zip) `icmd_auto export` wrote",
            "work": "the work folder to unpack it into",
            "overwrite": "replace an existing bundle (default: refuse)",
        },
        "pretrain": {
            "preset": f"the network size: {_choices(PRESETS)} (default: small)",
            "slice_profile": f"{profiles} (default: removal)",
            "device": "cpu | cuda (default: cuda where a GPU is present)",
            "keep": f"the weights prior_xR.pt holds: {' | '.join(KEEP_CHOICES)} (default: last, the last step's; best: best by the held-out in-plane validation)",
        },
        "version": {},
        "demo": {
            "work": "the folder for the example (default: icmd_demo)",
            "minutes": "the training time budget (default: 3)",
        },
    }


GLOBAL_FLAGS = (
    "Every command also takes --debug (an error shows its traceback instead of one line) and --quiet "
    "(warnings and errors only, no progress bars)."
)


def _document(command, options: dict[str, str]) -> None:
    """Give ``command``'s docstring an ``Args:`` section (fire's --help lists it under each flag)
    and the global flags."""
    lines = [command.__doc__.strip(), "", GLOBAL_FLAGS, "", "Args:"]
    for name in inspect.signature(command).parameters:
        if name in options:
            lines.append(f"    {name}: {options[name]}")
    command.__doc__ = "\n".join(lines)


COMMANDS = {
    "plan": plan,
    "train": train,
    "predict": predict,
    "evaluate": evaluate,
    "report": report,
    "export": export,
    "import": import_bundle,
    "demo": demo,
    "pretrain": pretrain,
    "version": version,
}

_QUIET = False

for _name, _options in _option_help().items():
    _document(COMMANDS["import" if _name == "import_bundle" else _name], _options)


def unknown_option(argv: list[str]) -> str | None:
    """The first ``--name`` a command without config overrides does not take (fire would run the
    command and complain afterwards); None when all are known or the command takes overrides."""
    if not argv or argv[0] not in COMMANDS:
        return None
    parameters = inspect.signature(COMMANDS[argv[0]]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None  # train, predict, evaluate: the api checks overrides against the bundle's configs
    for arg in argv[1:]:
        if arg == "--":
            break
        if arg.startswith("--") and len(arg) > 2:
            name = arg[2:].split("=", 1)[0].replace("-", "_")
            negated = name[2:] if name.startswith("no") else None  # fire's --noflag for a boolean
            if name != "help" and name not in parameters and negated not in parameters:
                return arg.split("=", 1)[0]
    return None


def main(argv: list[str] | None = None) -> int:
    global _QUIET
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    _QUIET = "--quiet" in argv
    argv = [a for a in argv if a not in ("--debug", "--quiet")]
    os.environ.setdefault("PAGER", "cat")  # fire pages --help through less on a terminal otherwise
    _setup_logging(_QUIET)
    option = unknown_option(argv)
    if option:
        known = ", ".join(f"--{p}" for p in inspect.signature(COMMANDS[argv[0]]).parameters)
        print(f"icmd_auto: error: {argv[0]} has no option {option} (its options: {known})", file=sys.stderr)
        return 2
    try:
        fire.Fire(COMMANDS, command=argv, name="icmd_auto")
    except ICMDError as e:
        if debug:
            raise
        print(f"icmd_auto: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("icmd_auto: interrupted", file=sys.stderr)
        return 130
    except fire.core.FireExit as e:
        return int(e.code or 0)
    except Exception as e:  # anything unexpected: one line, the traceback only with --debug
        if debug:
            raise
        print(
            f"icmd_auto: unexpected error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            f"(run again with --debug for the traceback)",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
