"""configs/multi_gpu_train.json: torchrun + DistributedDataParallel, here two CPU processes (gloo).

A third config (probe_config) records what each rank trained on and its final weights: the ranks
must draw different patches and end with identical weights.
"""

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


def probe_config(bundle, out) -> dict:
    """A third config for the test: each rank writes a digest of every batch it trains on to
    ``out/patches_rank<r>.txt`` and, after training, its network's weights to ``out/weights_rank<r>.pt``."""
    run = json.loads((bundle / "configs" / "train.json").read_text())["run"]
    assert run[-1] == "$@train#trainer.run()", run[-1]
    record = (
        "$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_STARTED, lambda engine: "
        f"open({str(out)!r} + '/patches_rank%d.txt' % dist.get_rank(), 'a').write('%d %s\\n' % "
        "(engine.state.iteration, hashlib.sha1(engine.state.batch['image'].numpy().tobytes()).hexdigest())))"
    )
    save = f"$torch.save(@network_def.state_dict(), {str(out)!r} + '/weights_rank%d.pt' % dist.get_rank())"
    return {"+initialize": ["$import hashlib"], "run": [*run[:-1], record, run[-1], save]}


@requires_shared_data
def test_two_processes_train_one_model_and_only_rank_0_writes(tiny_work, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_work / "bundle", bundle, ignore=shutil.ignore_patterns("models", "logs", "eval"))
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps(probe_config(bundle, tmp_path)))
    configs = [str(bundle / "configs" / "train.json"), str(bundle / "configs" / "multi_gpu_train.json")]
    configs.append(str(probe))
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
    # the ranks drew different patches at every iteration and ended with the same weights
    lines = [(tmp_path / f"patches_rank{r}.txt").read_text().splitlines() for r in (0, 1)]
    patches = [dict(line.split() for line in rank) for rank in lines]  # iteration -> digest of its batch
    assert list(patches[0]) == list(patches[1]) == [str(i) for i in range(1, EPOCHS * ITERATIONS + 1)]
    assert all(patches[0][i] != patches[1][i] for i in patches[0]), "each rank trains on patches of its own"
    weights = [torch.load(tmp_path / f"weights_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), "DDP kept the ranks in step"
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
