"""Prediction: one volume, or a batch of them, through the bundle's inference workflow.

``predict`` checks each input (integrity.py), runs the bundle's inference.json in this process
(runner.InferenceSession: the network is loaded once for a whole batch) and commits each output
whole: it is written under a temporary name in a scratch folder beside it and renamed into place.
api.py exposes ``predict``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import runner
from .dataset import read_dataset_json, write_dataset_json
from .dicom_writer import write_prediction_series
from .errors import ICMDError
from .fingerprint import CaseFingerprint, LoadedCase, sample_voxels
from .integrity import IntegrityReport, check_volume, ct_range_warning
from .preview import write_preview
from .template import scripts

logger = logging.getLogger("icmd_auto")

OUTPUT_FORMATS = ("nifti", "dicom")


def bundle_factor(bundle: Path) -> int:
    return int(json.loads((bundle / "configs" / "inference.json").read_text())["icmd"]["factor"])


@dataclass
class PredictionJob:
    """One case of ``predict``: where it comes from and where its results go."""

    input: Path
    output: Path
    preview: Path | None = None
    # SeriesInstanceUIDs to take from a DICOM folder holding several series (strict: it must hold one)
    series: tuple[str, ...] = ()
    strict: bool = False
    # the input as read by its check, handed to the bundle (no second decode); dropped after the case
    volume: object = None


@dataclass
class CheckedInput:
    """One input read and checked (with the series it was asked for): its fingerprint and the case
    as read. Zero-shot ``predict`` plans from it and predicts from it, reading the input once."""

    input: Path
    series: tuple[str, ...]
    fingerprint: CaseFingerprint
    case: LoadedCase


def _is_nifti_name(path: Path) -> bool:
    return str(path).endswith((".nii.gz", ".nii"))


def _preview_beside(output: Path) -> Path:
    """``out/scan_thin.nii.gz`` -> ``out/scan_thin.png`` (a DICOM output folder ``out/thin`` -> ``out/thin.png``)."""
    return output.with_name(scripts.io.case_name(output) + ".png")


def _batch_cases(input: Path) -> list[Path] | None:
    """The volumes of a batch input (a folder of volumes, or a dataset.json's training images);
    None when ``input`` is one volume (a NIfTI file or a DICOM series folder)."""
    if input.is_file() and input.suffix == ".json":
        return list(read_dataset_json(input).training)
    if input.is_dir() and not scripts.io.is_dicom_dir(input):
        try:
            return [Path(p) for p in scripts.io.list_inputs(input)]
        except FileNotFoundError as e:
            raise ICMDError(str(e)) from None
    return None


def _single_job(input: Path, output: Path, output_format: str, preview: str | bool | None) -> PredictionJob:
    if output_format == "nifti" and not _is_nifti_name(output):
        raise ICMDError(f"{output}: the output must be a NIfTI file name (.nii.gz or .nii)")
    if output_format == "dicom" and _is_nifti_name(output):
        raise ICMDError(f"{output}: with --output_format dicom the output is a folder for the new series")
    if output_format == "dicom" and not scripts.io.is_dicom_dir(input):
        raise ICMDError(
            f"{input}: --output_format dicom needs a DICOM series folder as input (its patient and study tags are carried over)"
        )
    if preview is True:
        preview_path = _preview_beside(output)
    elif preview:
        preview_path = Path(str(preview)).expanduser().absolute()
        if preview_path.suffix.lower() != ".png":
            raise ICMDError(f"--preview {preview}: the preview is a PNG file (.png)")
    else:
        preview_path = None
    return PredictionJob(input, output, preview_path)


def _batch_jobs(
    input: Path, cases: list[Path], output: Path, output_format: str, preview: str | bool | None
) -> list[PredictionJob]:
    if output.exists() and not output.is_dir():
        raise ICMDError(f"{output}: for several inputs the output is a folder; this is a file")
    if output == input:
        raise ICMDError(
            f"{output}: write the outputs to another folder than the inputs (they would be read as inputs next time)"
        )
    if preview not in (None, False, True):
        raise ICMDError(
            f"--preview {preview}: with several inputs give --preview alone; each case's PNG is written beside its output"
        )
    if output_format == "dicom":
        not_series = [c for c in cases if not scripts.io.is_dicom_dir(c)]
        if not_series:
            raise ICMDError(
                f"{not_series[0]}: --output_format dicom needs DICOM series folders as inputs "
                f"({len(not_series)} of {len(cases)} are not)"
            )
    suffix = "" if output_format == "dicom" else ".nii.gz"
    jobs, seen = [], {}
    for case in cases:
        name = f"{scripts.io.case_name(case)}_icmd"
        if name in seen:
            raise ICMDError(
                f"{case} and {seen[name]} would both be written to {output / name}{suffix}; rename one"
            )
        seen[name] = case
        jobs.append(
            PredictionJob(Path(case), output / f"{name}{suffix}", output / f"{name}.png" if preview else None)
        )
    return jobs


def _named_series(input: Path, cases: list[Path] | None, series, overrides: dict) -> tuple[str, ...]:
    """The SeriesInstanceUIDs named for ``predict``: ``--series``, a ``--dicom_series`` override and
    the entries of a dataset.json input."""
    named = scripts.dicom_series.series_uids(series) + scripts.dicom_series.series_uids(
        overrides.get("dicom_series")
    )
    if cases is not None and input.suffix == ".json":
        named += tuple(read_dataset_json(input).series_named())
    if named and cases is None and not scripts.io.is_dicom_dir(input):
        raise ICMDError(f"--series {named[0]}: {input} is not a DICOM folder; a series is named only for one")
    return tuple(dict.fromkeys(named))


def series_override(bundle: Path, config_files: list[str], series: tuple[str, ...]) -> dict:
    """The override that tells the bundle's DICOM reader which series to take (none if none is named)."""
    if not series:
        return {}
    try:
        runner.check_overrides(bundle, config_files, {"dicom_series": None})
    except ICMDError:
        raise ICMDError(
            f"{bundle}: its configs have no 'dicom_series' key, so its DICOM reader cannot take a named "
            "series; generate the bundle again with `icmd_auto plan` (or import a newer export)"
        ) from None
    return {"dicom_series": list(series)}


def _commit(result: Path, output: Path, scratch: Path) -> None:
    """Rename ``result`` to ``output``; an existing output (only with --overwrite) is moved away first."""
    if output.exists():
        os.replace(output, scratch / "previous")
    os.replace(result, output)


def _check_prediction_input(job: PredictionJob, checked: list[CheckedInput] | None = None) -> CheckedInput:
    """Check one case's input (refusing it in one line); ``job.volume`` keeps the volume read for
    the bundle. ``checked``: inputs read and checked already (zero-shot); the one that is this
    job's is taken from the list instead of read again."""
    done = [c for c in checked or () if (c.input, c.series) == (job.input, job.series)]
    if done:
        result = done[0]
        checked.remove(result)  # the volume is held by the job only, and goes with it
    else:
        fingerprint, case = check_volume(job.input, series=job.series, strict=job.strict)
        result = CheckedInput(job.input, job.series, fingerprint, case)
        warning = ct_range_warning(fingerprint)
        if warning:
            logger.warning(f"warning: {warning}")
    found = result.fingerprint.series
    if found and found not in job.series:  # found, not named: the bundle is told it
        job.series += (found,)
    job.volume = result.case.image
    return result


def _predict_one(
    session: runner.InferenceSession,
    job: PredictionJob,
    affine: np.ndarray,
    scratch: Path,
    factor: int,
    output_format: str,
) -> None:
    """Synthesise and write one checked case; everything goes through ``scratch`` (beside the output)."""
    try:
        volume, job.volume = job.volume, None
        session.run([str(job.input)], volumes=None if volume is None else [volume])
        del volume
    except runner.WorkflowError as e:
        raise ICMDError(
            f"{job.input}: prediction failed: {e} (run again with --debug for the traceback)"
        ) from e
    written = sorted(scratch.glob("*.nii*"))
    if len(written) != 1:
        raise ICMDError(f"inference wrote {len(written)} files for {job.input}; expected one")
    result = written[0]
    if job.preview:  # before the output is committed: a case is written whole or not at all
        write_preview(job.input, result, factor, job.preview, job.series)
    if output_format == "dicom":
        series = scratch / "series"
        write_prediction_series(result, job.input, affine, factor, series, job.series)
        result = series
    _commit(result, job.output, scratch)


def zero_shot_work(
    input: str | Path,
    work: Path,
    factor: int | None = None,
    series=None,
    quiet: bool = False,
    checked: CheckedInput | None = None,
) -> Path:
    """A work folder whose bundle holds the shipped prior for ``input``'s factor, untrained further.

    The planner runs as for a warm start (``init`` prior) on the input itself (for its factor,
    shape and plane chunk), with one epoch planned and none run; the prior becomes the model.
    ``checked``: ``input`` (one volume) read and checked already; its fingerprint is planned from.
    """
    input = Path(input).expanduser().absolute()
    if not input.exists():
        raise ICMDError(f"{input}: file not found")
    cases = _batch_cases(input) or [input]
    dataset = write_dataset_json(work / "dataset.json", [str(c) for c in cases], name="zero-shot")
    from .api import _plan, plan  # the planner's entry (api imports this module)

    options = {"factor": factor, "epochs": 1, "init": "prior", "trains": False}
    if checked is not None and cases == [checked.input]:  # as verify_images samples its first case
        report = IntegrityReport([checked.fingerprint], [sample_voxels(checked.case.array, seed=0)])
        plans = _plan(read_dataset_json(dataset), work, checked.series, report, options)
    else:
        plans = plan(dataset, work, series=series, **options)
    if plans["init"]["value"]["mode"] != "prior":  # plan refuses first; this is the contract
        raise ICMDError(plans["init"]["reason"])
    models = work / "bundle" / "models"
    shutil.copy2(models / "prior.pt", models / "model.pt")
    if not quiet:
        logger.info(
            f"zero-shot: the shipped prior for x{plans['factor']['value']} ({plans['factor']['reason']}); "
            "no training. Plan and train on your scans for more (README)"
        )
    return work


def predict(
    work: str | Path | None,
    input: str | Path,
    output: str | Path,
    overwrite: bool = False,
    resume: bool = False,
    quiet: bool = False,
    output_format: str = "nifti",
    preview: str | bool | None = None,
    series: str | list[str] | None = None,
    factor: int | None = None,
    **overrides,
) -> Path | dict:
    """Synthesise thin slices for one volume, or for every volume of a folder or a dataset.json.

    One volume (a NIfTI file or a DICOM series folder) goes to ``output``: with ``output_format``
    "nifti" a .nii.gz / .nii file, with "dicom" a folder holding a new DICOM series (the input
    must then be a DICOM series, whose patient and study tags are carried over). Returns the path.

    Several volumes (``input`` a folder of NIfTI files and DICOM series folders, or a dataset.json
    whose training images are taken) go into the folder ``output``, each to ``<case>_icmd.nii.gz``
    (or the series folder ``<case>_icmd``), one after the other with the network loaded once. A
    failing case is reported and the others go on; the failures are raised together at the end.
    Returns {"written": [...], "skipped": [...]}.

    Every output is written under a temporary name beside it and renamed into place. An existing
    output is a refusal before any work unless ``overwrite`` (replace it) or ``resume`` (skip the
    case). ``preview``: a .png path (one volume) or True (beside each output): coronal and
    sagittal planes of input and output (preview.py). ``series``: SeriesInstanceUIDs to take where
    a DICOM folder holds several series (one volume: the folder must hold it); a dataset.json's
    entries may name theirs.

    Without ``work`` (zero-shot) the shipped CT prior for the input's factor does it, with no plan
    and no training: ``factor`` or the input's spacing (median z / in-plane, rounded) picks it.
    """
    args = (input, output, overwrite, resume, quiet, output_format, preview, series)
    if work is None:
        checked = _zero_shot_input(Path(input).expanduser().absolute(), series, overrides)
        pending = [checked] if checked else []
        with tempfile.TemporaryDirectory(prefix="icmd_zero_shot_") as scratch_work:
            work = zero_shot_work(
                input, Path(scratch_work), factor=factor, series=series, quiet=quiet, checked=checked
            )
            del checked  # the job takes the volume out of ``pending``: it goes with the case
            return _predict(work, *args, checked=pending, **overrides)
    return _predict(work, *args, factor=factor, **overrides)


def _zero_shot_input(input: Path, series, overrides: dict) -> CheckedInput | None:
    """One volume for zero-shot ``predict``, read and checked once for the plan and the prediction
    (as ``_predict`` checks it); None for a batch or a missing input (refused where it was)."""
    if not input.exists() or _batch_cases(input) is not None:
        return None
    named = _named_series(input, None, series, overrides)
    return _check_prediction_input(PredictionJob(input, input, series=named, strict=bool(named)))


def _predict(
    work: str | Path,
    input: str | Path,
    output: str | Path,
    overwrite: bool = False,
    resume: bool = False,
    quiet: bool = False,
    output_format: str = "nifti",
    preview: str | bool | None = None,
    series: str | list[str] | None = None,
    factor: int | None = None,
    checked: list[CheckedInput] | None = None,
    **overrides,
) -> Path | dict:
    """``predict`` with a work folder; ``checked``: inputs read and checked already (zero-shot)."""
    if factor is not None and int(factor) != bundle_factor(runner.bundle_dir(work)):
        raise ICMDError(
            f"--factor {factor}: the bundle in {work} synthesises x{bundle_factor(runner.bundle_dir(work))}; "
            "plan again for another factor, or leave out --work to use the shipped prior"
        )
    bundle = runner.bundle_dir(work)
    runner.trained_model(bundle)
    if output_format not in OUTPUT_FORMATS:
        raise ICMDError(f"--output_format {output_format!r}: choose one of {', '.join(OUTPUT_FORMATS)}")
    if overwrite and resume:
        raise ICMDError("--resume keeps existing outputs and --overwrite replaces them: pass one of the two")
    runner.check_overrides(bundle, ["inference.json"], overrides)
    input, output = Path(input).expanduser().absolute(), Path(output).expanduser().absolute()
    if not input.exists():
        raise ICMDError(f"{input}: file not found")
    cases = _batch_cases(input)
    if cases is None:
        jobs = [_single_job(input, output, output_format, preview)]
    else:
        jobs = _batch_jobs(input, cases, output, output_format, preview)
    series = _named_series(input, cases, series, overrides)
    for job in jobs:
        job.series, job.strict = series, cases is None and bool(series)
    overrides.update(series_override(bundle, ["inference.json"], series))
    skipped = [job for job in jobs if resume and job.output.exists()]
    todo = [job for job in jobs if job not in skipped]
    if not overwrite:
        clash = [p for job in todo for p in (job.output, job.preview) if p is not None and p.exists()]
        if clash and cases is None:
            raise ICMDError(f"{clash[0]}: exists; pass --overwrite to replace it")
        if clash:
            more = f" (and {len(clash) - 1} more)" if len(clash) > 1 else ""
            raise ICMDError(
                f"{clash[0]}: exists{more}; pass --resume to skip the cases already done or --overwrite to replace them"
            )
    for job in skipped:
        logger.info(f"skipped {job.input.name}: {job.output} exists (--resume)")
    factor = bundle_factor(bundle)
    failures, written = [], []
    overrides.setdefault("progress", (not quiet) and os.isatty(2))
    scratch, session = None, None  # made beside the outputs once a case has passed its check
    try:
        for i, job in enumerate(todo, 1):
            if cases is not None:
                logger.info(f"[{i}/{len(todo)}] {job.input} -> {job.output}")
            try:
                affine = _check_prediction_input(job, checked).case.affine
                if session is None:
                    job.output.parent.mkdir(parents=True, exist_ok=True)
                    scratch = Path(tempfile.mkdtemp(prefix=".icmd_predict_", dir=job.output.parent))
                    session = runner.InferenceSession(
                        bundle,
                        ["inference.json"],
                        quiet=quiet,
                        output_dir=str(scratch),
                        output_postfix="icmd",
                        # a DICOM output's NIfTI is read back once: not worth compressing
                        output_ext=".nii"
                        if output_format == "dicom" or job.output.suffix == ".nii"
                        else ".nii.gz",
                        **{**overrides, **series_override(bundle, ["inference.json"], job.series)},
                    )
                _predict_one(session, job, affine, scratch, factor, output_format)
                written.append(job.output)
            except Exception as e:
                if cases is None:
                    raise
                message = str(e) if isinstance(e, ICMDError) else f"{job.input}: {runner.error_summary(e)}"
                logger.error(f"failed: {message}")
                failures.append(message)
            finally:
                for leftover in scratch.iterdir() if scratch else ():
                    shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    finally:
        if session:
            session.close()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if cases is None:
        return output
    if failures:
        lines = "\n".join(f"  - {f}" for f in failures)
        raise ICMDError(
            f"{len(failures)} of {len(jobs)} case(s) failed ({len(written)} written, {len(skipped)} skipped as "
            f"done); re-run with --resume to retry only these:\n{lines}"
        )
    return {"written": [str(p) for p in written], "skipped": [str(j.output) for j in skipped]}
