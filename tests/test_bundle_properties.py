"""The generated bundle has every property MONAI requires of a training and an inference workflow.

MONAI's tools (and model-zoo checks) drive a bundle through these properties: ``train#trainer``,
``train#dataset``, ``train#inferer``, ``dataset``, ``evaluator``, ``inferer``, ... Checked as a
MONAI user checks them, in a process where icmd_auto cannot be imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHECK = """
import json, sys
sys.modules["icmd_auto"] = None  # the bundle alone
from monai.bundle import ConfigWorkflow

bundle, dataset_dir = sys.argv[1], sys.argv[2]
missing = {}
for workflow_type, config in (("train", "train.json"), ("infer", "inference.json")):
    workflow = ConfigWorkflow(
        config_file=f"{bundle}/configs/{config}",
        meta_file=f"{bundle}/configs/metadata.json",
        logging_file=False,
        workflow_type=workflow_type,
        bundle_root=bundle,
        dataset_dir=dataset_dir,
    )
    workflow.initialize()  # properties are read from the parsed config
    try:
        missing[workflow_type] = workflow.check_properties()
    except KeyError as e:  # MONAI raises on a required property whose config id is absent
        missing[workflow_type] = [str(e)]
print("MISSING " + json.dumps(missing))
"""


def test_train_and_infer_workflows_have_every_required_property(phantom_work):
    bundle = phantom_work / "bundle"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", CHECK, str(bundle), str(phantom_work.parent / "phantom.nii.gz")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(phantom_work.parent),
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("MISSING ")][-1]
    assert json.loads(line[len("MISSING ") :]) == {"train": [], "infer": []}
