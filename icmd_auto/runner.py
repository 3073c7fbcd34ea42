"""Running the generated bundle's workflows: training in a subprocess, inference in-process.

Training runs ``python -m monai.bundle run`` in a child process, exactly the command a MONAI
user would type, so what icmd_auto trains is what the bundle trains. Inference and evaluation
run the same configs in-process through ``monai.bundle.ConfigWorkflow`` (no second start-up).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path

from .errors import ICMDError

logger = logging.getLogger("icmd_auto")


def bundle_dir(work: str | Path) -> Path:
    bundle = Path(work).expanduser().absolute() / "bundle"
    if not (bundle / "configs" / "train.json").is_file():
        raise ICMDError(
            f"{Path(work)}: no bundle found (expected {bundle}/configs/train.json); run `icmd_auto plan` first"
        )
    return bundle


def trained_model(bundle: Path) -> Path:
    model = bundle / "models" / "model.pt"
    if not model.is_file():
        raise ICMDError(f"{model}: no trained model; run `icmd_auto train --work {bundle.parent}` first")
    return model


def _purge_scripts_modules() -> None:
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[name]


@contextlib.contextmanager
def bundle_on_path(bundle: Path):
    """Make ``scripts`` resolve to this bundle's package (and only for the duration)."""
    _purge_scripts_modules()
    sys.path.insert(0, str(bundle))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(bundle))
        _purge_scripts_modules()


def run_workflow(bundle: Path, config_files: list[str], quiet: bool = False, **overrides) -> None:
    """initialize / run / finalize a bundle workflow in this process."""
    from monai.bundle import ConfigWorkflow

    configs = [str(bundle / "configs" / name) for name in config_files]
    overrides.setdefault("bundle_root", str(bundle))
    with bundle_on_path(bundle):
        workflow = ConfigWorkflow(
            config_file=configs if len(configs) > 1 else configs[0],
            meta_file=str(bundle / "configs" / "metadata.json"),
            logging_file=str(bundle / "configs" / "logging.conf"),
            workflow_type=None,
            **overrides,
        )
        if quiet:
            logging.getLogger().setLevel(logging.WARNING)
        workflow.initialize()
        try:
            workflow.run()
        finally:
            workflow.finalize()


def _override_args(overrides: dict) -> list[str]:
    """``--key value`` pairs as monai.bundle's fire parser reads them (Python literals: False, [1, 2])."""
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else repr(value)]
    return args


def train_command(bundle: Path, **overrides) -> list[str]:
    """The ``python -m monai.bundle run`` command line that trains this bundle."""
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--bundle_root",
        str(bundle),
        "--config_file",
        str(bundle / "configs" / "train.json"),
        "--meta_file",
        str(bundle / "configs" / "metadata.json"),
        "--logging_file",
        str(bundle / "configs" / "logging.conf"),
        *_override_args(overrides),
    ]


def run_training(bundle: Path, **overrides) -> int:
    """Train in a child process; returns its exit code. Output streams to this terminal."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # the bundle must run on its own: no icmd_auto on the path is needed (or used)
    proc = subprocess.run(train_command(bundle, **overrides), env=env, cwd=str(bundle))
    return proc.returncode
