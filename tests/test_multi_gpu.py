"""configs/multi_gpu_train.json: torchrun + DistributedDataParallel, here two CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import torch
from conftest import requires_shared_data

from icmd_auto.template import scripts

EPOCHS, ITERATIONS = 2, 2


@requires_shared_data
def test_two_processes_train_one_model_and_only_rank_0_writes(tiny_work, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_work / "bundle", bundle, ignore=shutil.ignore_patterns("models", "logs", "eval"))
    configs = [str(bundle / "configs" / "train.json"), str(bundle / "configs" / "multi_gpu_train.json")]
    # the documented command: torchrun --nproc_per_node=N -m monai.bundle run --config_file "[train, multi_gpu]"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "--bundle_root", str(bundle), "--config_file", repr(configs),
        "--epochs", str(EPOCHS), "--iterations_per_epoch", str(ITERATIONS), "--log_interval", "1",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env=env)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    for rank in (0, 1):
        assert f"rank {rank} of 2: backend gloo, device cpu, network DistributedDataParallel" in log
        for epoch in range(1, EPOCHS + 1):  # each rank draws its own patches
            assert f"rank {rank}: epoch {epoch} draws with seed {rank + 2 * epoch}" in log
    # rank 0 alone writes: one metrics line per iteration (each rank runs every iteration), one event file
    records = [
        json.loads(line) for line in (bundle / "logs" / "train_metrics.jsonl").read_text().splitlines()
    ]
    assert [r["iteration"] for r in records] == list(range(1, EPOCHS * ITERATIONS + 1))
    assert len(list((bundle / "logs").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (bundle / "models").iterdir()) == [f"checkpoint_{EPOCHS}.pt", "model.pt"]
    # the weights are the network's own (no DDP "module." prefix) and load into the plain network
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert not [k for k in state if k.startswith("module.")]
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    net = scripts.networks.ICMDNet(
        factor=inference["icmd"]["factor"],
        axial=inference["architecture"]["axial"],
        planar=inference["architecture"]["planar"],
    )
    net.load_state_dict(state)
