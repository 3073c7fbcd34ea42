"""The package: a non-editable wheel ships the bundle template; the CLI lists its commands."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from conftest import REPO, run_cli


def test_wheel_ships_the_bundle_template(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("icmd_auto-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in (
        "configs/train.json",
        "configs/inference.json",
        "configs/evaluate.json",
        "configs/metadata.json",
        "configs/logging.conf",
        "scripts/networks/han.py",
        "scripts/training.py",
        "docs/README.md",
        "LICENSE",
    ):
        assert f"icmd_auto/bundle_template/{path}" in names, path
    assert "icmd_auto/cli.py" in names


def test_help_lists_every_command_with_one_line():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("plan", "train", "predict", "evaluate", "export", "import", "demo"):
        assert f"     {command}\n" in result.stdout + result.stderr, command
