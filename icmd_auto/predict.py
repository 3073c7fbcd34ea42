"""Prediction: one volume, or a batch of them, through the bundle's inference workflow.

``predict`` checks each input (integrity.py), runs the bundle's inference.json in this process
(runner.InferenceSession: the network is loaded once for a whole batch) and commits each output
whole: it is written under a temporary name in a scratch folder beside it and renamed into place.
api.py exposes ``predict``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import runner
from .batch import (
    SCRATCH_PREFIX,
    BatchReport,
    CaseProgress,
    CaseRecord,
    MemoryProbe,
    OutputLock,
    Part,
    disk_full,
    earlier_records,
    failure_message,
    now,
    remove_stale_scratch,
    unfinished,
)
from .dataset import read_dataset_json, write_dataset_json
from .dicom_writer import write_prediction_series
from .errors import DatasetIntegrityError, ICMDError
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
    _check_batch_output(input, output)
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


def _durable(path: Path) -> None:
    """Flush ``path`` (a file, or a series folder's files) to the disk before it is renamed into place,
    so that after a crash of the machine, not only of the process, a final name holds a whole output."""
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _commit(result: Path, output: Path, scratch: Path) -> None:
    """Rename ``result`` to ``output``; an existing output (only with --overwrite) is moved away first."""
    _durable(result)
    if output.exists():
        os.replace(output, scratch / "previous")
    os.replace(result, output)
    folder = os.open(output.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself
    finally:
        os.close(folder)


def _check_prediction_input(job: PredictionJob, checked: list[CheckedInput] | None = None) -> CheckedInput:
    """Check one case's input (refusing it in one line); ``job.volume`` keeps the volume read for
    the bundle. ``checked``: inputs read and checked already (zero-shot); the one that is this
    job's is taken from the list instead of read again."""
    done = [c for c in checked or () if (c.input, c.series) == (job.input, job.series)]
    if not done and not os.path.lexists(job.input):
        raise ICMDError(f"{job.input}: gone: it was listed when the batch started, and is no longer there")
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


def _readable(cases: list[Path], series, entry_series: dict) -> IntegrityReport:
    """The cases of a batch that pass their check, for a zero-shot plan: the others are left out
    here, and fail in the batch, each in its row of the report."""
    report, problems = IntegrityReport(), []
    uids = scripts.dicom_series.series_uids(series)
    for i, case in enumerate(cases):
        named = entry_series.get(str(case))
        try:
            fingerprint, loaded = check_volume(case, series=(named,) if named else uids, strict=bool(named))
        except ICMDError as e:
            problems.append(str(e))
            continue
        report.cases.append(fingerprint)
        report.samples.append(sample_voxels(loaded.array, seed=i))
    if not report.cases:
        raise DatasetIntegrityError(f"{len(cases)} inputs, none readable", problems)
    return report


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
    A batch is planned from the cases that can be read (the others fail in the batch).
    """
    from .api import _plan  # the planner's entry (api imports this module)

    input = Path(input).expanduser().absolute()
    if not input.exists():
        raise ICMDError(f"{input}: file not found")
    batch = _batch_cases(input)
    options = {"factor": factor, "epochs": 1, "init": "prior", "trains": False}
    uids = scripts.dicom_series.series_uids(series)
    if checked is not None and batch is None and checked.input == input:
        report = IntegrityReport([checked.fingerprint], [sample_voxels(checked.case.array, seed=0)])
        cases, uids = [input], checked.series
    elif batch is not None:
        entries = read_dataset_json(input).entry_series if input.suffix == ".json" else {}
        report = _readable(batch, uids, entries)
        cases = [Path(c.image) for c in report.cases]
    else:
        report, cases = None, [input]
    work.mkdir(parents=True, exist_ok=True)
    dataset = write_dataset_json(work / "dataset.json", [str(c) for c in cases], name="zero-shot")
    planner_log = logging.getLogger("icmd_auto.planner")
    level = planner_log.level
    planner_log.setLevel(logging.WARNING)  # the decisions of an internal plan are not predict's output
    try:
        plans = _plan(read_dataset_json(dataset), work, uids, report, options)
    finally:
        planner_log.setLevel(level)
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
    num_parts: int = 1,
    part_id: int = 0,
    **overrides,
) -> Path | dict:
    """Synthesise thin slices for one volume, or for every volume of a folder or a dataset.json.

    One volume (a NIfTI file or a DICOM series folder) goes to ``output``: with ``output_format``
    "nifti" a .nii.gz / .nii file, with "dicom" a folder holding a new DICOM series (the input
    must then be a DICOM series, whose patient and study tags are carried over). Returns the path.

    Several volumes (``input`` a folder of NIfTI files and DICOM series folders, or a dataset.json
    whose training images are taken) go into the folder ``output``, each to ``<case>_icmd.nii.gz``
    (or the series folder ``<case>_icmd``), one after the other with the network loaded once: a
    batch (batch.py). It locks the folder (a second batch there refuses), writes
    ``predict_report.json`` and ``.csv`` beside the outputs, and goes on past a failing case; the
    failures are raised together at the end, naming the report. A full disk stops it (the partial
    file removed). ``num_parts``/``part_id``: this run does the sorted cases ``[part_id::num_parts]``
    and writes ``predict_report.partIofN.json``. Returns {"written": [...], "skipped": [...],
    "report": path}.

    Every output is written under a temporary name beside it and renamed into place. An existing
    output is a refusal before any work unless ``overwrite`` (replace it) or ``resume`` (skip the
    case: a resumed batch does exactly the cases that failed or were never finished). ``preview``: a
    .png path (one volume) or True (beside each output): coronal and sagittal planes of input and
    output (preview.py). ``series``: SeriesInstanceUIDs to take where a DICOM folder holds several
    series (one volume: the folder must hold it); a dataset.json's entries may name theirs.

    Without ``work`` (zero-shot) the shipped CT prior for the input's factor does it, with no plan
    and no training: ``factor`` or the input's spacing (median z / in-plane, rounded) picks it.
    """
    part = Part.of(num_parts, part_id)
    input, output = Path(input).expanduser().absolute(), Path(output).expanduser().absolute()
    batch = input.exists() and _batch_cases(input) is not None
    if part.split and not batch:
        raise ICMDError(f"--num_parts {part.count}: {input} is one volume; parts split a batch (a folder)")
    with contextlib.ExitStack() as scope:
        if batch:
            _check_batch_output(input, output)
            output.mkdir(parents=True, exist_ok=True)
            # before a zero-shot plan reads the cases: a refusal comes first
            scope.enter_context(OutputLock(output, part))
        checked = None
        if work is None:
            scratch_work = Path(scope.enter_context(tempfile.TemporaryDirectory(prefix="icmd_zero_shot_")))
            one = None if batch else _zero_shot_input(input, series, overrides)
            work = zero_shot_work(
                input,
                scratch_work,
                factor=factor,
                series=series,
                quiet=quiet,
                checked=one,
            )
            checked = [one] if one else None
            del one  # the job takes the volume out of ``checked``: it goes with the case
            factor = None  # the zero-shot plan took it
        bundle = runner.bundle_dir(work)
        if factor is not None and int(factor) != bundle_factor(bundle):
            raise ICMDError(
                f"--factor {factor}: the bundle in {work} synthesises x{bundle_factor(bundle)}; "
                "plan again for another factor, or leave out --work to use the shipped prior"
            )
        runner.trained_model(bundle)
        if output_format not in OUTPUT_FORMATS:
            raise ICMDError(f"--output_format {output_format!r}: choose one of {', '.join(OUTPUT_FORMATS)}")
        if overwrite and resume:
            raise ICMDError(
                "--resume keeps existing outputs and --overwrite replaces them: pass one of the two"
            )
        runner.check_overrides(bundle, ["inference.json"], overrides)
        if not input.exists():
            raise ICMDError(f"{input}: file not found")
        cases = _batch_cases(input)
        if cases is None:
            jobs = [_single_job(input, output, output_format, preview)]
        else:
            jobs = part.select(_batch_jobs(input, cases, output, output_format, preview))
        series = _named_series(input, cases, series, overrides)
        for job in jobs:
            job.series, job.strict = series, cases is None and bool(series)
        overrides.update(series_override(bundle, ["inference.json"], series))
        overrides.setdefault("progress", (not quiet) and os.isatty(2))
        if cases is None:
            if resume and output.exists():
                logger.info(f"skipped {input.name}: {output} exists (--resume)")
                return output
            if output.exists() and not overwrite:
                raise ICMDError(f"{output}: exists; pass --overwrite to replace it")
            if jobs[0].preview and jobs[0].preview.exists() and not overwrite:
                raise ICMDError(f"{jobs[0].preview}: exists; pass --overwrite to replace it")
            predictor = _Predictor(bundle, quiet, output_format, overrides, ".icmd_predict_")
            try:
                predictor(jobs[0], checked)
            finally:
                predictor.close()
            return output
        return _run_batch(
            bundle, input, output, jobs, part, overwrite, resume, quiet, output_format, overrides
        )


def _zero_shot_input(input: Path, series, overrides: dict) -> CheckedInput | None:
    """One volume for zero-shot ``predict``, read and checked once for the plan and the prediction
    (as ``predict`` checks it); None for a missing input (refused where it was)."""
    if not input.exists():
        return None
    named = _named_series(input, None, series, overrides)
    return _check_prediction_input(PredictionJob(input, input, series=named, strict=bool(named)))


def _check_batch_output(input: Path, output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise ICMDError(f"{output}: for several inputs the output is a folder; this is a file")
    if output == input:
        raise ICMDError(
            f"{output}: write the outputs to another folder than the inputs (they would be read as inputs next time)"
        )


class _Predictor:
    """The bundle's inference session and a scratch folder beside the outputs, both made at the first
    case that passes its check and kept for the next ones (the network is loaded once)."""

    def __init__(self, bundle: Path, quiet: bool, output_format: str, overrides: dict, scratch_prefix: str):
        self.bundle, self.quiet, self.output_format = bundle, quiet, output_format
        self.overrides, self.scratch_prefix = overrides, scratch_prefix
        self.factor = bundle_factor(bundle)
        self.scratch: Path | None = None
        self.session: runner.InferenceSession | None = None

    @property
    def model_loads(self) -> int:
        return self.session.starts if self.session else 0

    def __call__(self, job: PredictionJob, checked: list[CheckedInput] | None = None) -> None:
        try:
            affine = _check_prediction_input(job, checked).case.affine
            if self.session is None:
                job.output.parent.mkdir(parents=True, exist_ok=True)
                self.scratch = Path(tempfile.mkdtemp(prefix=self.scratch_prefix, dir=job.output.parent))
                self.session = runner.InferenceSession(
                    self.bundle,
                    ["inference.json"],
                    quiet=self.quiet,
                    output_dir=str(self.scratch),
                    output_postfix="icmd",
                    # a DICOM output's NIfTI is read back once: not worth compressing
                    output_ext=".nii"
                    if self.output_format == "dicom" or job.output.suffix == ".nii"
                    else ".nii.gz",
                    **{**self.overrides, **series_override(self.bundle, ["inference.json"], job.series)},
                )
            _predict_one(self.session, job, affine, self.scratch, self.factor, self.output_format)
        finally:
            job.volume = None
            for leftover in self.scratch.iterdir() if self.scratch else ():
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()

    def close(self) -> None:
        if self.session:
            self.session.close()
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)


def _run_batch(
    bundle: Path,
    input: Path,
    output: Path,
    jobs: list[PredictionJob],
    part: Part,
    overwrite: bool,
    resume: bool,
    quiet: bool,
    output_format: str,
    overrides: dict,
) -> dict:
    """The cases of a batch (this part's), one after the other, each recorded in the report."""
    earlier = earlier_records(output) if resume else {}
    skipped = [job for job in jobs if resume and job.output.exists()]
    todo = [job for job in jobs if job not in skipped]
    if not overwrite:
        # with --resume a to-do case's preview is an unfinished case's: it is replaced
        clash = [p for job in todo for p in (job.output, None if resume else job.preview) if p and p.exists()]
        if clash:
            more = f" (and {len(clash) - 1} more)" if len(clash) > 1 else ""
            raise ICMDError(
                f"{clash[0]}: exists{more}; pass --resume to skip the cases already done or --overwrite to replace them"
            )
    remove_stale_scratch(output, part)
    records = {}
    for job in jobs:
        before = earlier.get(str(job.output))
        record = CaseRecord(
            str(job.input), str(job.output), list(job.series), previous=before and before.outcome()
        )
        if job in skipped:
            record.status, record.reason, record.finished = "skipped", "output exists (--resume)", now()
        records[id(job)] = record
    memory = MemoryProbe()
    report = BatchReport(
        part.report_path(output),
        {
            "kind": "icmd_auto predict batch report",
            "input": str(input),
            "output": str(output),
            "bundle": str(bundle),
            "factor": bundle_factor(bundle),
            "part": {"id": part.id, "count": part.count},
            "resume": resume,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": now(),
            "memory": memory.describe(),
        },
        [records[id(job)] for job in jobs],
    )
    predictor = _Predictor(bundle, quiet, output_format, overrides, f"{SCRATCH_PREFIX}{part.tag}_")
    if not quiet:
        logger.info(
            f"batch{' ' + part.describe() if part.split else ''}: {len(todo)} case(s) to do"
            + (f", {len(skipped)} skipped as done (--resume)" if skipped else "")
            + f"; report: {report.path}"
        )
    report.save()
    try:
        with CaseProgress(len(todo), quiet) as progress:
            for job in todo:
                record = records[id(job)]
                record.status = "running"
                report.save()
                memory.start()
                start = time.perf_counter()
                full = None
                try:
                    predictor(job)
                    record.status = "written"
                except Exception as e:
                    message = (
                        str(e) if isinstance(e, ICMDError) else f"{job.input}: {runner.error_summary(e)}"
                    )
                    full = disk_full(e)
                    if full is not None:
                        message = (
                            f"{job.input}: no space left on device for {job.output} ({errno.errorcode[full.errno]}); the partial "
                            "file was removed and the cases written before are whole: free space, then --resume"
                        )
                    logger.error(f"failed: {message}")
                    record.status = "failed"
                    reason = message.removeprefix(f"{job.input}: ")
                    record.reason = " / ".join(line.strip() for line in reason.splitlines() if line.strip())
                record.seconds = round(time.perf_counter() - start, 3)
                record.series = list(job.series)
                peak, rss = memory.read()
                record.peak_memory_mb = peak and round(peak, 1)
                record.rss_mb = rss and round(rss, 1)
                record.finished = now()
                report.header["model_loads"] = predictor.model_loads
                report.save()
                progress.done(record, record.seconds)
                if full is not None:
                    unfinished(records.values(), "", "not started: the batch stopped when the disk was full")
                    break
    except BaseException:
        unfinished(records.values(), "interrupted during this case", "not started: the batch was interrupted")
        raise
    finally:
        predictor.close()
        report.header["finished"] = now()
        report.header["model_loads"] = predictor.model_loads
        report.save()
    counts = report.counts()
    failures = report.failures()
    if failures:
        raise ICMDError(failure_message(failures, len(jobs), counts, report.path))
    return {
        "written": [r.output for r in report.records if r.status == "written"],
        "skipped": [r.output for r in report.records if r.status == "skipped"],
        "report": str(report.path),
    }
