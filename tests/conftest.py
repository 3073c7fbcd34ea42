"""Shared fixtures: real CT from ../shared/data (skipped when absent), small made volumes, tiny bundles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CHEST = SHARED_DATA / "ct" / "totalseg_chest_1.5mm.nii.gz"
ABDOMEN = SHARED_DATA / "ct" / "totalseg_example_ct_3mm.nii.gz"
DICOM_SERIES = SHARED_DATA / "ct" / "totalseg_dicom_series"

requires_shared_data = pytest.mark.skipif(
    not CHEST.exists(),
    reason=f"real CT test data not found at {SHARED_DATA} (clone the project beside shared/)",
)

# noise added to every weight by perturbed(): about what training leaves in the residual branches
PERTURBATION_STD = 0.02


def perturbed(weights, seed: int = 0, std: float = PERTURBATION_STD):
    """``weights`` (an nn.Module, changed in place and returned, or a state dict, copied) with seeded
    Gaussian noise added to every floating-point tensor, the zero-initialised last layers and
    attention scales included: trained-like weights whose views really differ from linear
    interpolation and from each other (a freshly built network's views are all linear interpolation)."""
    import torch

    generator = torch.Generator().manual_seed(seed)

    def noise(t):
        return torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.dtype) * std

    if isinstance(weights, torch.nn.Module):
        with torch.no_grad():
            for p in weights.parameters():
                p.add_(noise(p))
        return weights
    return {k: v + noise(v) if v.is_floating_point() else v.clone() for k, v in weights.items()}


# a training run of a few iterations: the tiny preset, no time budget
TINY_TRAIN = {"epochs": 3, "iterations_per_epoch": 2, "log_interval": 1}


def thicken(src: Path, dst: Path, factor: int, crop: tuple[int, int] | None = None) -> Path:
    """Keep every ``factor``-th slice (z-spacing x factor); optionally crop x/y to ``crop``."""
    img = nib.load(str(src))
    data = np.asanyarray(img.dataobj)
    if crop:
        data = data[: crop[0], : crop[1]]
    affine = img.affine.copy()
    affine[:3, 2] *= factor
    out = nib.Nifti1Image(data[:, :, ::factor], affine, img.header)
    out.set_sform(affine, code=int(img.header["sform_code"]) or 2)
    nib.save(out, str(dst))
    return dst


def write_dataset(path: Path, training: list, test: list | None = None, **extra) -> Path:
    doc = {
        "name": path.parent.name,
        "channel_names": {"0": "CT"},
        "training": [{"image": str(p)} for p in training],
        "test": [str(p) for p in (test or [])],
        **extra,
    }
    path.write_text(json.dumps(doc))
    return path


def run_cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """The `icmd_auto` command as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "icmd_auto", *args], capture_output=True, text=True, timeout=timeout
    )


def run_main(capfd, *args: str) -> subprocess.CompletedProcess:
    """The `icmd_auto` command run in this process: its ``main()``, which `python -m icmd_auto` exits
    with, so the same exit code and output, without the seconds a new process spends importing."""
    from icmd_auto import cli

    capfd.readouterr()  # only this command's output
    code = cli.main(list(args))
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["icmd_auto", *args], code, out, err)


def run_bundle(
    bundle: Path, configs: list[str], overrides: dict, timeout: int = 900
) -> subprocess.CompletedProcess:
    """`python -m monai.bundle run` on a bundle, with icmd_auto made unimportable in that process."""
    files = [str(bundle / "configs" / c) for c in configs]
    argv = [
        "run",
        "--bundle_root",
        str(bundle),
        "--config_file",
        files[0] if len(files) == 1 else repr(files),
    ]
    for key, value in overrides.items():
        argv += [
            f"--{key}",
            value if isinstance(value, str) else repr(value),
        ]  # Python literals, as fire reads them
    code = (
        "import sys, runpy; sys.modules['icmd_auto'] = None; "  # any `import icmd_auto` now fails
        f"sys.argv = ['monai.bundle'] + {argv!r}; runpy.run_module('monai.bundle', run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(bundle.parent),
        env=env,
    )


@pytest.fixture(scope="session")
def chest_x3(tmp_path_factory) -> Path:
    """The real chest CT thickened to 4.5 mm (every 3rd slice): 122 x 102 x 38."""
    if not CHEST.exists():
        pytest.skip(f"real CT test data not found at {SHARED_DATA}")
    return thicken(CHEST, tmp_path_factory.mktemp("chest") / "chest_x3.nii.gz", 3)


@pytest.fixture(scope="session")
def tiny_work(tmp_path_factory, chest_x3) -> Path:
    """A planned and briefly trained tiny bundle on the thick chest (shared by inference tests)."""
    from icmd_auto import api

    root = tmp_path_factory.mktemp("tiny_work")
    dataset = write_dataset(root / "dataset.json", [chest_x3], test=[CHEST])
    api.plan(dataset, root / "work", preset="tiny", memory_gb=4, recipe="icmd")  # all three views
    result = run_bundle(root / "work" / "bundle", ["train.json"], TINY_TRAIN)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root / "work"


# the phantom of phantom_work: small, thick (3 mm slices), CT-like; no real CT needed
PHANTOM_SHAPE, PHANTOM_SPACING = (32, 32, 12), (1.0, 1.0, 3.0)


@pytest.fixture(scope="session")
def phantom_work(tmp_path_factory) -> Path:
    """A tiny bundle planned at x3 on a synthetic CT phantom and trained a few iterations.

    For tests that need a trained bundle but not real data: they run in a clone without
    ../shared. The phantom is ``phantom_work.parent / "phantom.nii.gz"``.
    """
    from icmd_auto import api
    from icmd_auto.synthetic import ct_phantom, save_nifti

    root = tmp_path_factory.mktemp("phantom_work")
    image = root / "phantom.nii.gz"
    save_nifti(ct_phantom(PHANTOM_SHAPE, PHANTOM_SPACING), PHANTOM_SPACING, str(image))
    dataset = write_dataset(root / "dataset.json", [image])
    api.plan(dataset, root / "work", preset="tiny", memory_gb=2, factor=3, recipe="icmd")  # all three views
    result = run_bundle(root / "work" / "bundle", ["train.json"], TINY_TRAIN)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root / "work"


@pytest.fixture(autouse=True)
def _shipped_priors(monkeypatch):
    """Every test starts with the shipped priors: ``--prior DIR`` in-process (prior.use_directory)
    sets ICMD_AUTO_PRIORS for the process, and monkeypatch restores it after the test."""
    monkeypatch.setenv("ICMD_AUTO_PRIORS", "")  # empty: prior_dir() takes the shipped folder
