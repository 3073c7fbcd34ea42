"""Experiment tracking: MONAI's `--tracking mlflow` into a local SQLite store, TensorBoard by default."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import requires_shared_data, run_bundle

mlflow = pytest.importorskip("mlflow", reason="mlflow is an optional extra: pip install icmd_auto[tracking]")
ITERATIONS = 3


def train_losses(bundle):
    lines = (bundle / "logs" / "train_metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["total"] for line in lines]


@requires_shared_data
def test_mlflow_tracks_the_training_loss_locally(tiny_work, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_work / "bundle", bundle, ignore=shutil.ignore_patterns("models", "logs", "eval"))
    store = tmp_path / "tracking" / "mlruns.db"
    overrides = {
        "epochs": 1,
        "iterations_per_epoch": ITERATIONS,
        "log_interval": 1,
        "tracking": "mlflow",
        "tracking_uri": f"sqlite:///{store}",
        "experiment_name": "icmd_chest",
    }
    result = run_bundle(bundle, ["train.json"], overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = train_losses(bundle)
    assert len(losses) == ITERATIONS

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("icmd_chest").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["max_epochs"] == "1"
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, ITERATIONS + 1))
    assert [m.value for m in history] == pytest.approx(losses), "MLflow logs the trainer's total loss"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert len(artifacts) == 1 and artifacts[0].startswith("config_"), "the executed config is recorded"
    assert (store.parent / "mlruns").is_dir(), "artifacts live beside the store, not in the working folder"

    # TensorBoard, on by default, has the same losses in logs/
    (events,) = (bundle / "logs").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert [e.value for e in accumulator.Scalars("train_loss")] == pytest.approx(losses)
