"""The Python API behind the `icmd_auto` command (cli.py is a thin layer over these functions).

Prediction lives in predict.py; ``predict`` and ``zero_shot_work`` are re-exported here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

from . import runner
from .batch import merge_reports
from .bundle_writer import write_bundle
from .dataset import read_dataset_json
from .errors import ICMDError
from .export import export_bundle as export  # noqa: F401  (`icmd_auto export`)
from .export import import_bundle  # noqa: F401  (`icmd_auto import`)
from .fingerprint import dataset_fingerprint, write_fingerprint
from .integrity import IntegrityReport, verify_dataset_integrity, verify_images
from .planner import PlanOptions, plan_experiment
from .predict import (  # noqa: F401  (predict, zero_shot_work: `icmd_auto predict`)
    bundle_factor,
    predict,
    series_override,
    zero_shot_work,
)
from .template import scripts

logger = logging.getLogger("icmd_auto")


def _write_json(path: Path, content: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    tmp.replace(path)


def _log_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        logger.warning(f"warning: {warning}")


def plan(dataset: str | Path, work: str | Path, series: str | list[str] | None = None, **options) -> dict:
    """Check the dataset, write fingerprint.json and plans.json, and generate ``<work>/bundle``.

    ``series``: SeriesInstanceUIDs to take where a DICOM folder holds several series (an entry's
    own "series" is taken from its folder); the bundle's DICOM reader is told the same.
    Options (all optional): factor, target_spacing_z, slice_profile, preset, time_budget_min,
    memory_gb, epochs, seed, recipe (a key of planner.RECIPES), method (a dict of icmd#...
    overrides over the recipe).
    """
    return _plan(read_dataset_json(dataset), work, scripts.dicom_series.series_uids(series), None, options)


def _plan(
    spec, work: str | Path, series: tuple[str, ...], report: IntegrityReport | None, options: dict
) -> dict:
    """``plan`` of a read dataset.json; ``report``: its images checked already (zero-shot
    ``predict`` reads its one input once, for the plan and the prediction), else checked here."""
    opts = PlanOptions(**options)
    if opts.factor is None and spec.factor is not None:
        opts.factor = spec.factor
    if opts.target_spacing_z is None and spec.target_spacing_z is not None:
        opts.target_spacing_z = spec.target_spacing_z
    if opts.slice_profile is None and spec.slice_profile is not None:
        opts.slice_profile = spec.slice_profile
    if report is None:
        report = verify_dataset_integrity(spec, series=series)
    _log_warnings(report.warnings)
    fingerprint = dataset_fingerprint(report.cases, report.samples, spec.name)
    fingerprint["dataset_json"] = str(spec.path)
    plans = plan_experiment(fingerprint, opts)  # refuses before anything is written
    work = Path(work).expanduser().absolute()
    work.mkdir(parents=True, exist_ok=True)
    write_fingerprint(fingerprint, work / "fingerprint.json")
    _write_json(work / "plans.json", plans)
    # the series taken from folders that hold several: the bundle's reader is told the same
    write_bundle(
        plans, work, [c.image for c in report.cases], sorted({c.series for c in report.cases} - {None})
    )
    return plans


def _check_training_images(bundle: Path, overrides: dict) -> None:
    """The images the bundle will train on (its datalist, overrides applied), checked before training."""
    config = bundle / "configs" / "train.json"
    try:
        factor = int(runner.config_value(bundle, ["train.json"], "icmd#factor", **overrides))
        datalist = runner.config_value(bundle, ["train.json"], "datalist", **overrides)
        # (a bundle generated before DICOM series could be named has no such key)
        named = "dicom_series" in overrides or "dicom_series" in json.loads(config.read_text())
        series = runner.config_value(bundle, ["train.json"], "dicom_series", **overrides) if named else None
        holdout = int(runner.config_value(bundle, ["train.json"], "validation#holdout_slices", **overrides))
    except Exception as e:  # an exported bundle lists --dataset_dir, which may be missing or empty
        raise ICMDError(
            f"{config}: the training images cannot be listed ({runner.error_summary(e)})"
        ) from None
    if isinstance(datalist, (str, Path)) or not datalist:
        raise ICMDError(f"{config}: 'datalist' must be a non-empty list of images, got {datalist!r}")
    report = verify_images(
        list(datalist),
        f"{config} datalist",
        min_slices=factor + 1 + holdout,
        purpose=f"internal learning at x{factor}"
        + (f" with {holdout} slices held out for validation" if holdout else ""),
        series=scripts.dicom_series.series_uids(series),
    )
    _log_warnings(report.warnings)


def train(work: str | Path, restart: bool = False, quiet: bool = False, **overrides) -> dict:
    """Train the generated bundle (resuming from its latest checkpoint); returns a summary.

    The overrides (config keys) and the training images are checked before anything runs.
    """
    bundle = runner.bundle_dir(work)
    runner.check_overrides(bundle, ["train.json"], overrides)
    _check_training_images(bundle, overrides)
    models, logs = bundle / "models", bundle / "logs"
    if restart:
        for path in models.glob("checkpoint_*.pt"):
            path.unlink()
        for name in ("train_metrics.jsonl", "validation_metrics.jsonl"):
            (logs / name).unlink(missing_ok=True)
    resumed_from = scripts.handlers.latest_checkpoint(str(models)) if models.is_dir() else None
    if resumed_from:
        logger.info(f"resuming from {resumed_from} (pass --restart to train from scratch)")
    overrides.setdefault("progress", (not quiet) and os.isatty(2))
    start = time.time()
    code = runner.run_training(bundle, **overrides)
    elapsed = time.time() - start
    run = _record_run(Path(work).expanduser().absolute(), bundle, start, elapsed, resumed_from)
    if code != 0:
        raise ICMDError(
            f"training failed (exit code {code}); the log above says why. Re-run to resume from the "
            f"last checkpoint in {models}"
        )
    summary = {
        "model": str(runner.trained_model(bundle)),
        "seconds": round(elapsed, 1),
        "resumed_from": resumed_from,
        "run": run,
    }
    metrics = logs / "train_metrics.jsonl"
    if metrics.exists():
        lines = metrics.read_text().strip().splitlines()
        if lines:
            summary["last"] = json.loads(lines[-1])
    validations = logs / "validation_metrics.jsonl"
    if validations.exists():
        lines = validations.read_text().strip().splitlines()
        if lines:  # model.pt holds the weights of the best validation
            last = json.loads(lines[-1])
            summary["model_validation"] = {
                k: last[k] for k in ("key_metric", "best_metric", "best_metric_epoch")
            }
    return summary


def _record_run(
    work: Path, bundle: Path, start: float, seconds: float, resumed_from: str | None
) -> dict | None:
    """What this training run did against what the plan planned, appended to plans.json's ``runs``
    (None where the work folder has no plans.json, e.g. an imported bundle): epochs, iterations and
    seconds planned and trained; seconds per iteration as the plan counts them (the run's seconds
    after the planned start-up, over its iterations)."""
    from .planner import STARTUP_S

    path = work / "plans.json"
    metrics = bundle / "logs" / "train_metrics.jsonl"
    if not path.is_file() or not metrics.is_file():
        return None
    plans = json.loads(path.read_text())
    training = plans.get("training", {}).get("value", {})
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("time", 0) >= start]
    if not training or not records:
        return None
    ipe = int(training["iterations_per_epoch"])
    resumed_epoch = re.search(r"_(\d+)\.pt$", resumed_from or "")
    first = int(resumed_epoch.group(1)) * ipe if resumed_epoch else 0  # checkpoint_<epoch>.pt
    iterations = records[-1]["iteration"] - first
    step = plans.get("seconds_per_iteration", {}).get("value")
    run = {
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "resumed": bool(resumed_from),
        "planned": {
            "epochs": training["epochs"],
            "iterations": training["epochs"] * ipe,
            "seconds": training.get("planned_seconds"),
            "seconds_per_iteration": step,
            "time_limit_s": training.get("time_limit_s", 0),
        },
        "real": {
            "epochs": records[-1]["epoch"],
            "iterations": records[-1]["iteration"],
            "seconds": round(seconds, 1),
            "seconds_per_iteration": round(max(seconds - STARTUP_S, 0.0) / iterations, 4)
            if iterations > 0
            else None,
        },
    }
    plans.setdefault("runs", []).append(run)
    _write_json(path, plans)
    return run


def evaluate(
    work: str | Path,
    dataset: str | Path,
    out: str | Path | None = None,
    quiet: bool = False,
    series: str | list[str] | None = None,
    **overrides,
) -> dict:
    """The simulated-thick protocol on the dataset's test images (or its training images if none).

    The images are thin ground truth: each is made thick with the bundle's factor, synthesised
    back, and compared. ``series``: SeriesInstanceUIDs to take where a DICOM folder holds several
    series (an entry's own "series" is taken from its folder). Returns the report (also written to
    ``out``, default <work>/evaluation.json).
    """
    bundle = runner.bundle_dir(work)
    runner.trained_model(bundle)
    configs = ["inference.json", "evaluate.json"]
    runner.check_overrides(bundle, configs, overrides)
    spec = read_dataset_json(dataset)
    images = spec.test or spec.training
    factor = bundle_factor(bundle)
    series = scripts.dicom_series.series_uids(series)
    report = verify_images(
        images,
        str(spec.path),
        min_slices=factor + 1,
        purpose=f"the simulated-thick protocol at x{factor}",
        series=series,
        entry_series=spec.entry_series,
    )
    taken = tuple(sorted({c.series for c in report.cases} - {None}))  # the bundle's reader is told the same
    overrides.update(series_override(bundle, configs, taken))
    _log_warnings(report.warnings)
    out = Path(out).expanduser().absolute() if out else Path(work).expanduser().absolute() / "evaluation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    overrides.setdefault("progress", (not quiet) and os.isatty(2))
    if spec.slice_profile:
        overrides.setdefault("slice_profile", spec.slice_profile)
    tmp = out.with_name(out.name + ".partial")
    try:
        runner.run_workflow(
            bundle, configs, quiet=quiet, datalist=[str(p) for p in images], report_path=str(tmp), **overrides
        )
        os.replace(tmp, out)
    except runner.WorkflowError as e:
        raise ICMDError(
            f"{spec.path}: evaluation failed: {e} (run again with --debug for the traceback)"
        ) from e
    finally:
        tmp.unlink(missing_ok=True)
    return json.loads(out.read_text())


def report(out_dir: str | Path) -> dict:
    """The batch reports in ``out_dir`` (each part's, and a whole batch's) merged into
    ``predict_report.json`` and ``.csv``; returns the merged report (batch.merge_reports)."""
    return merge_reports(out_dir)
