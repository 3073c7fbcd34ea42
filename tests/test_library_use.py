"""icmd_auto used as a library: a prediction leaves the caller's process as it found it.

The caller's root logger (level and handlers), its sys.path and its own module named `scripts`
survive a quiet prediction; the bundle's code runs under a private package name.
"""

from __future__ import annotations

import logging
import sys
import types

import nibabel as nib
import pytest

from icmd_auto import api, runner


@pytest.fixture()
def callers_scripts(monkeypatch):
    """A module named `scripts` (and a submodule) of the calling program's own."""
    mine = types.ModuleType("scripts")
    mine.__path__ = []
    sub = types.ModuleType("scripts.helpers")
    mine.helpers = sub
    monkeypatch.setitem(sys.modules, "scripts", mine)
    monkeypatch.setitem(sys.modules, "scripts.helpers", sub)
    return mine, sub


@pytest.fixture()
def callers_root_logger():
    """The root logger at DEBUG with a handler of the caller's; put back as it was after the test."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    mine = logging.StreamHandler(sys.stderr)
    root.handlers[:] = [mine]
    root.setLevel(logging.DEBUG)
    yield root, mine
    root.handlers[:] = handlers
    root.setLevel(level)


def test_quiet_prediction_leaves_logging_sys_path_and_the_callers_scripts_alone(
    phantom_work, tmp_path, callers_scripts, callers_root_logger
):
    root, handler = callers_root_logger
    handlers, path = list(root.handlers), list(sys.path)  # the caller's, and pytest's capture handlers
    assert handler in handlers
    phantom = phantom_work.parent / "phantom.nii.gz"
    out = api.predict(phantom_work, phantom, tmp_path / "thin.nii.gz", quiet=True)
    assert nib.load(str(out)).shape[2] == (nib.load(str(phantom)).shape[2] - 1) * 3 + 1, "it predicted"
    assert root.level == logging.DEBUG, f"root logger left at {logging.getLevelName(root.level)}"
    assert root.handlers == handlers, "the bundle's logging.conf handler is gone, the caller's are back"
    assert sys.path == path, f"sys.path changed: {[p for p in sys.path if p not in path]}"
    mine, sub = callers_scripts
    assert sys.modules["scripts"] is mine and sys.modules["scripts.helpers"] is sub, "the caller's `scripts`"


def test_bundle_code_is_imported_under_a_private_name(phantom_work, callers_scripts):
    bundle = phantom_work / "bundle"
    net = runner.config_value(bundle, ["inference.json"], "network_def")
    name = runner.bundle_scripts(bundle)
    assert name.startswith(runner.PRIVATE_PREFIX) and type(net).__module__ == f"{name}.networks.icmd"
    assert sys.modules["scripts"] is callers_scripts[0], "the caller's `scripts` is still `scripts`"
    targets = runner.private_targets(bundle, ["inference.json"])
    assert targets["network_def#_target_"] == f"{name}.networks.ICMDNet"
    on_disk = (bundle / "configs" / "inference.json").read_text()
    assert '"scripts.networks.ICMDNet"' in on_disk and name not in on_disk, "MONAI users keep `scripts.…`"
