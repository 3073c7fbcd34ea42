"""The Python API behind the `icmd_auto` command (cli.py is a thin layer over these functions)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from . import runner
from .bundle_writer import write_bundle
from .dataset import read_dataset_json
from .dicom_writer import write_prediction_series
from .errors import ICMDError
from .export import export_bundle as export  # noqa: F401  (`icmd_auto export`)
from .export import import_bundle  # noqa: F401  (`icmd_auto import`)
from .fingerprint import CaseReadError, dataset_fingerprint, load_case_array, write_fingerprint
from .integrity import check_case, verify_dataset_integrity
from .planner import PlanOptions, plan_experiment
from .template import scripts

logger = logging.getLogger("icmd_auto")

OUTPUT_FORMATS = ("nifti", "dicom")


def _write_json(path: Path, content: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    tmp.replace(path)


def plan(dataset: str | Path, work: str | Path, **options) -> dict:
    """Check the dataset, write fingerprint.json and plans.json, and generate ``<work>/bundle``.

    Options (all optional): factor, target_spacing_z, slice_profile, preset, time_budget_min,
    memory_gb, epochs, seed, method (a dict of icmd#... overrides).
    """
    spec = read_dataset_json(dataset)
    opts = PlanOptions(**options)
    if opts.factor is None and spec.factor is not None:
        opts.factor = spec.factor
    if opts.target_spacing_z is None and spec.target_spacing_z is not None:
        opts.target_spacing_z = spec.target_spacing_z
    if opts.slice_profile is None and spec.slice_profile is not None:
        opts.slice_profile = spec.slice_profile
    report = verify_dataset_integrity(spec)
    for warning in report.warnings:
        logger.warning(f"warning: {warning}")
    fingerprint = dataset_fingerprint(report.cases, report.samples, spec.name)
    fingerprint["dataset_json"] = str(spec.path)
    plans = plan_experiment(fingerprint, opts)  # refuses before anything is written
    work = Path(work).expanduser().absolute()
    work.mkdir(parents=True, exist_ok=True)
    write_fingerprint(fingerprint, work / "fingerprint.json")
    _write_json(work / "plans.json", plans)
    write_bundle(plans, work, [c.image for c in report.cases])
    return plans


def train(work: str | Path, restart: bool = False, quiet: bool = False, **overrides) -> dict:
    """Train the generated bundle (resuming from its latest checkpoint); returns a summary."""
    bundle = runner.bundle_dir(work)
    models, logs = bundle / "models", bundle / "logs"
    if restart:
        for path in models.glob("checkpoint_*.pt"):
            path.unlink()
        metrics = logs / "train_metrics.jsonl"
        if metrics.exists():
            metrics.unlink()
    resumed_from = scripts.handlers.latest_checkpoint(str(models)) if models.is_dir() else None
    if resumed_from:
        logger.info(f"resuming from {resumed_from} (pass --restart to train from scratch)")
    overrides.setdefault("progress", (not quiet) and os.isatty(2))
    start = time.time()
    code = runner.run_training(bundle, **overrides)
    elapsed = time.time() - start
    if code != 0:
        raise ICMDError(
            f"training failed (exit code {code}); the log above says why. Re-run to resume from the "
            f"last checkpoint in {models}"
        )
    summary = {
        "model": str(runner.trained_model(bundle)),
        "seconds": round(elapsed, 1),
        "resumed_from": resumed_from,
    }
    metrics = logs / "train_metrics.jsonl"
    if metrics.exists():
        lines = metrics.read_text().strip().splitlines()
        if lines:
            summary["last"] = json.loads(lines[-1])
    return summary


def _check_input(path: Path, factor: int) -> np.ndarray:
    """Refuse an input that cannot be synthesised; returns its affine (MONAI's RAS convention)."""
    try:
        array, affine, _ = load_case_array(path)
    except CaseReadError as e:
        raise ICMDError(str(e)) from None
    problems = check_case(str(path), array)
    if problems:
        raise ICMDError(problems[0])
    if array.shape[-1] < 2:
        raise ICMDError(
            f"{path}: {array.shape[-1]} slice(s); at least 2 are needed to synthesise between them"
        )
    return affine


def _bundle_factor(bundle: Path) -> int:
    return int(json.loads((bundle / "configs" / "inference.json").read_text())["icmd"]["factor"])


def predict(
    work: str | Path,
    input: str | Path,
    output: str | Path,
    overwrite: bool = False,
    quiet: bool = False,
    output_format: str = "nifti",
    **overrides,
) -> Path:
    """Synthesise thin slices for one volume (NIfTI file or DICOM series folder) into ``output``.

    ``output_format``: "nifti", a .nii.gz / .nii file; or "dicom", a folder holding a new DICOM
    series (the input must then be a DICOM series, whose patient and study tags are carried over).
    The output is written under a temporary name beside it and renamed into place; an existing
    output is only replaced with ``overwrite``.
    """
    bundle = runner.bundle_dir(work)
    runner.trained_model(bundle)
    if output_format not in OUTPUT_FORMATS:
        raise ICMDError(f"--output_format {output_format!r}: choose one of {', '.join(OUTPUT_FORMATS)}")
    input, output = Path(input).expanduser().absolute(), Path(output).expanduser().absolute()
    if not input.exists():
        raise ICMDError(f"{input}: file not found")
    nifti_name = str(output).endswith((".nii.gz", ".nii"))
    if output_format == "nifti" and not nifti_name:
        raise ICMDError(f"{output}: the output must be a NIfTI file name (.nii.gz or .nii)")
    if output_format == "dicom" and nifti_name:
        raise ICMDError(f"{output}: with --output_format dicom the output is a folder for the new series")
    if output_format == "dicom" and not scripts.io.is_dicom_dir(input):
        raise ICMDError(
            f"{input}: --output_format dicom needs a DICOM series folder as input (its patient and study tags are carried over)"
        )
    if output.exists() and not overwrite:
        raise ICMDError(f"{output}: exists; pass --overwrite to replace it")
    factor = _bundle_factor(bundle)
    input_affine = _check_input(input, factor)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=".icmd_predict_", dir=output.parent))
    try:
        overrides.setdefault("progress", (not quiet) and os.isatty(2))
        runner.run_workflow(
            bundle,
            ["inference.json"],
            quiet=quiet,
            datalist=[str(input)],
            output_dir=str(tmpdir),
            output_postfix="icmd",
            output_ext=".nii.gz" if str(output).endswith(".gz") else ".nii",
            **overrides,
        )
        written = sorted(tmpdir.glob("*.nii*"))
        if len(written) != 1:
            raise ICMDError(f"inference wrote {len(written)} files for {input}; expected one")
        result = written[0]
        if output_format == "dicom":
            result = tmpdir / "series"
            write_prediction_series(written[0], input, input_affine, factor, result)
        if output.exists():  # only reached with overwrite
            os.replace(output, tmpdir / "previous")
        os.replace(result, output)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return output


def evaluate(
    work: str | Path, dataset: str | Path, out: str | Path | None = None, quiet: bool = False, **overrides
) -> dict:
    """The simulated-thick protocol on the dataset's test images (or its training images if none).

    The images are thin ground truth: each is made thick with the bundle's factor, synthesised
    back, and compared. Returns the report (also written to ``out``, default <work>/evaluation.json).
    """
    bundle = runner.bundle_dir(work)
    runner.trained_model(bundle)
    spec = read_dataset_json(dataset)
    images = spec.test or spec.training
    verify_dataset_integrity(spec, include_test=True)
    factor = _bundle_factor(bundle)
    out = Path(out).expanduser().absolute() if out else Path(work).expanduser().absolute() / "evaluation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for image in images:
        _, _, z = load_case_array(image)[0].shape[:3]
        if z < factor + 1:
            raise ICMDError(
                f"{image}: {z} slices; the simulated-thick protocol at x{factor} needs at least {factor + 1}"
            )
    overrides.setdefault("progress", (not quiet) and os.isatty(2))
    if spec.slice_profile:
        overrides.setdefault("slice_profile", spec.slice_profile)
    tmp = out.with_name(out.name + ".partial")
    runner.run_workflow(
        bundle,
        ["inference.json", "evaluate.json"],
        quiet=quiet,
        datalist=[str(p) for p in images],
        report_path=str(tmp),
        **overrides,
    )
    os.replace(tmp, out)
    return json.loads(out.read_text())
