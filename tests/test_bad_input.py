"""Bad input for plan, train, predict and evaluate: one line naming the file and the problem, a
non-zero exit, no traceback, and no output. A non-CT intensity range is a warning, not a refusal.

Each case runs the command's main() in this process (run_main), as `python -m icmd_auto` does;
test_truncated_file_from_the_real_command_line runs real processes for one case of each command.
The trained bundle is conftest's phantom_work (a synthetic phantom): only the DICOM cases need the
real series in ../shared/data, so a clone without it still runs every other case.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import DICOM_SERIES, run_cli, run_main, write_dataset

from icmd_auto import api
from icmd_auto.errors import ICMDError
from icmd_auto.synthetic import ct_phantom

COMMANDS = ("plan", "train", "predict", "evaluate")
FACTOR = 3  # the factor of `planned` here and of the session's phantom_work (conftest)
SPACING = (1.0, 1.0, 3.0)

# case -> what the one error line says (besides the file's path)
REFUSALS = {
    "missing": "file not found",
    "truncated": "cannot be read as a NIfTI (Compressed file ended before the end-of-stream marker",
    "non_image": "cannot be read as a NIfTI (File",
    "two_d": "2-D image (shape [32, 32]); a 3-D CT volume is needed",
    "four_d": "4-D image (shape [16, 16, 8, 3]); one 3-D channel is needed",
    "nan_inf": "2 voxels are NaN or Inf",
    "few_slices": None,  # per command, below
    "dicom_missing_slice": "missing slice(s): 4 mm between instances 275 and 277, 2 times the series' 2 mm step",
    # two series in one folder, neither named: listed for --series (tests/test_dicom_export.py)
    "dicom_mixed_series": (
        '2 axial CT series; name one with --series UID (or "series" in its dataset.json entry): '
        '1.2.826.0.1.3680043.8.498.1 "CT Body 3.0" (10 slices, 3 mm, kernel Br38f\\3); '
        '1.2.826.0.1.3680043.8.498.2 "CT Body 3.0" (10 slices, 3 mm, kernel Br38f\\3)'
    ),
    "dicom_mixed_geometry": "mixed series: slices of 512x512 and 256x256 pixels in one folder",
    "dicom_varying_spacing": "varying slice spacing: 2.5 mm between instances 277 and 278, 2 mm elsewhere",
    "unknown_key": None,
}
FEW_SLICES = {
    "plan": "too few slices for factor 3: internal learning needs at least r+1 = 4 slices per case; few.nii.gz (3 slices)",
    "train": "3 slice(s); internal learning at x3 with 3 slices held out for validation needs at least 7",
    "predict": "1 slice(s); slice synthesis needs at least 2",
    "evaluate": "3 slice(s); the simulated-thick protocol at x3 needs at least 4",
}


def _nifti(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([*SPACING, 1.0])), str(path))
    return path


def _phantom(slices: int = 12) -> np.ndarray:
    return ct_phantom((32, 32, 12), SPACING)[:, :, :slices]


def _dicom_copy(folder: Path) -> list[Path]:
    """The real 20-slice series copied (writable), its files in InstanceNumber order (267 ... 286)."""
    folder.mkdir()
    for f in DICOM_SERIES.iterdir():
        shutil.copyfile(f, folder / f.name)
    return sorted(
        folder.iterdir(), key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber)
    )


def _rewrite(path: Path, **tags) -> None:
    """Change header tags only (the JPEG 2000 pixel data is written back as it was)."""
    ds = pydicom.dcmread(path)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def make_bad(case: str, command: str, folder: Path) -> Path:
    """The bad input ``case`` as ``command`` would meet it, written under ``folder``."""
    if case == "missing":
        return folder / "absent.nii.gz"
    if case == "truncated":
        whole = _nifti(folder / "whole.nii.gz", _phantom()).read_bytes()
        (folder / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
        return folder / "truncated.nii.gz"
    if case == "non_image":
        (folder / "notes.nii.gz").write_text("minutes of the meeting, not an image")
        return folder / "notes.nii.gz"
    if case == "two_d":
        return _nifti(folder / "flat.nii.gz", np.zeros((32, 32), np.int16))
    if case == "four_d":
        return _nifti(folder / "movie.nii.gz", np.zeros((16, 16, 8, 3), np.int16))
    if case == "nan_inf":
        data = _phantom().astype(np.float32)
        data[3, 4, 5], data[1, 1, 1] = np.nan, np.inf
        return _nifti(folder / "broken.nii.gz", data)
    if case == "few_slices":  # r slices cannot train or be made thick at x r; 1 slice cannot be synthesised
        return _nifti(folder / "few.nii.gz", _phantom(1 if command == "predict" else FACTOR))
    if case.startswith("dicom_"):
        if not DICOM_SERIES.exists():
            pytest.skip(f"real CT DICOM series not found at {DICOM_SERIES}")
        series = folder / case
        files = _dicom_copy(series)
        if case == "dicom_missing_slice":
            files[9].unlink()  # instance 276
        elif case == "dicom_mixed_series":
            for i, f in enumerate(files):
                _rewrite(f, SeriesInstanceUID=f"1.2.826.0.1.3680043.8.498.{1 + i % 2}")
        elif case == "dicom_mixed_geometry":
            for f in files[:5]:
                _rewrite(f, Rows=256, Columns=256)
        elif case == "dicom_varying_spacing":
            for k, f in enumerate(files[11:], start=1):  # from instance 278 on, 2.5 mm apart
                x, y, z = (float(v) for v in pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient)
                _rewrite(f, ImagePositionPatient=[x, y, z - 0.5 * k])
        return series
    raise ValueError(case)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return _nifti(tmp_path_factory.mktemp("good") / "good.nii.gz", _phantom())


@pytest.fixture(scope="module")
def planned(tmp_path_factory, good) -> Path:
    """A bundle planned (not trained) at x3 on a small phantom."""
    root = tmp_path_factory.mktemp("planned")
    api.plan(
        write_dataset(root / "dataset.json", [good]), root / "work", preset="tiny", memory_gb=2, factor=FACTOR
    )
    return root / "work"


def command_line(
    command: str, bad: Path, tmp_path: Path, good, planned, phantom_work
) -> tuple[list[str], list[Path]]:
    """``command`` meeting ``bad`` the way a user would; returns its arguments and the outputs it
    must not write when it refuses."""
    if command == "plan":
        dataset = write_dataset(tmp_path / "dataset.json", [good, bad])
        work = tmp_path / "work"
        args = ["--dataset", str(dataset), "--work", str(work), "--preset", "tiny", "--factor", str(FACTOR)]
        return ["plan", *args], [work]
    if command == "train":  # the images come from the bundle's datalist; here a user's override of it
        work = tmp_path / "work"  # a copy: a successful run must not touch the shared bundle
        shutil.copytree(planned, work)
        args = [
            "--work",
            str(work),
            "--datalist",
            repr([str(bad)]),
            "--epochs",
            "1",
            "--iterations_per_epoch",
            "1",
        ]
        return ["train", *args], [work / "bundle" / "models", work / "bundle" / "logs"]
    if command == "predict":
        out = tmp_path / "out" / "thin.nii.gz"
        args = ["--work", str(phantom_work), "--input", str(bad), "--output", str(out)]
        return ["predict", *args], [out.parent]
    if command == "evaluate":
        dataset = write_dataset(tmp_path / "dataset.json", [good], test=[bad])
        report = tmp_path / "report.json"
        args = ["--work", str(phantom_work), "--dataset", str(dataset), "--out", str(report)]
        return ["evaluate", *args], [report, report.with_name("report.json.partial")]
    raise ValueError(command)


def assert_refused(result, names: str, says: str, outputs: list[Path]) -> None:
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"one line, got:\n{result.stderr}"
    assert lines[0].startswith("icmd_auto: error: ")
    assert names in lines[0] and says in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    for path in outputs:
        assert not path.exists(), f"{path} was written"


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_input_is_refused_in_one_line(case, command, tmp_path, capfd, good, planned, phantom_work):
    if case == "unknown_key":
        args, outputs = command_line(command, good, tmp_path, good, planned, phantom_work)
        if command == "plan":  # plan takes no config overrides: an unknown option
            result = run_main(capfd, *args, "--no_such_key", "1")
            assert result.returncode == 2 and result.stderr.startswith(
                "icmd_auto: error: plan has no option --no_such_key"
            )
            assert len(result.stderr.splitlines()) == 1 and not outputs[0].exists(), (
                "refused before anything ran"
            )
            return
        result = run_main(capfd, *args, "--icmd#gama", "0.3")
        assert_refused(result, "--icmd#gama", "no such key", outputs)
        return
    bad = make_bad(case, command, tmp_path)
    args, outputs = command_line(command, bad, tmp_path, good, planned, phantom_work)
    result = run_main(capfd, *args)
    says = FEW_SLICES[command] if case == "few_slices" else REFUSALS[case]
    names = bad.name if case == "few_slices" and command == "plan" else str(bad)
    assert_refused(result, names, says, outputs)


def test_unknown_key_suggests_the_one_meant(planned, capfd):
    result = run_main(capfd, "train", "--work", str(planned), "--icmd#gama", "0.3")
    assert "--icmd#gama: no such key in train.json" in result.stderr
    assert "(did you mean --icmd#gamma?)" in result.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_non_ct_intensities_warn_and_go_on(command, tmp_path, capfd, good, planned, phantom_work):
    unit = _nifti(tmp_path / "unit.nii.gz", np.random.default_rng(0).random((32, 32, 12)).astype(np.float32))
    args, outputs = command_line(command, unit, tmp_path, good, planned, phantom_work)
    result = run_main(capfd, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    warning = f"warning: {unit}: no air found (0.5th percentile 0.0); the intensities may not be CT Hounsfield units"
    assert warning in result.stderr.splitlines()
    assert outputs[0].exists(), "the command did its work"


@pytest.mark.parametrize("command", ["train", "predict"])  # a child process; the in-process workflow
def test_truncated_file_from_the_real_command_line(command, tmp_path, good, planned, phantom_work):
    """As a user runs it: a new process, its real exit status and stderr."""
    bad = make_bad("truncated", command, tmp_path)
    args, outputs = command_line(command, bad, tmp_path, good, planned, phantom_work)
    assert_refused(run_cli(*args), str(bad), REFUSALS["truncated"], outputs)


def test_debug_shows_the_traceback(tmp_path, phantom_work, capfd):
    bad = make_bad("truncated", "predict", tmp_path)
    args, _ = command_line("predict", bad, tmp_path, None, None, phantom_work)
    result = run_cli(*args, "--debug")
    assert result.returncode != 0 and "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().endswith(
        "(Compressed file ended before the end-of-stream marker was reached)"
    )
    with pytest.raises(ICMDError, match="Compressed file ended"):
        run_main(capfd, *args, "--debug")
