"""Training through the bundle alone: stages in the metrics log, resume, and every method switch."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CHEST, requires_shared_data, run_bundle, thicken, write_dataset
from monai.bundle import ConfigParser

from icmd_auto import api
from icmd_auto.template import TEMPLATE_DIR, scripts

TERMS = scripts.training.LOSS_TERMS


@pytest.fixture(scope="module")
def crop_work(tmp_path_factory):
    """A tiny plan on a 64 x 64 crop of the real chest CT thickened x3."""
    if not CHEST.exists():
        pytest.skip("real CT test data not found")
    root = tmp_path_factory.mktemp("crop")
    thick = thicken(CHEST, root / "chest_crop_x3.nii.gz", 3, crop=(64, 64))
    api.plan(
        write_dataset(root / "dataset.json", [thick]),
        root / "work",
        preset="tiny",
        memory_gb=2,
        recipe="icmd",
    )
    return root / "work"


def read_metrics(bundle, name="train_metrics.jsonl"):
    return [json.loads(line) for line in (bundle / "logs" / name).read_text().splitlines()]


def assert_model_is_the_best_validated(bundle):
    """model.pt holds the network of the epoch with the highest validation PSNR so far."""
    validations = read_metrics(bundle, "validation_metrics.jsonl")
    best = max(validations, key=lambda r: r["val_psnr"])
    assert (
        validations[-1]["best_metric"] == best["val_psnr"]
        and validations[-1]["best_metric_epoch"] == best["epoch"]
    )
    model = torch.load(bundle / "models" / "model.pt", weights_only=True)
    saved = torch.load(bundle / "models" / f"checkpoint_{best['epoch']}.pt", weights_only=True)["network"]
    assert all(torch.equal(model[k], saved[k]) for k in saved)
    return validations


@requires_shared_data
def test_bundle_trains_without_icmd_auto_through_the_stages_and_resumes(crop_work):
    bundle = crop_work / "bundle"
    overrides = {
        "epochs": 3,
        "iterations_per_epoch": 2,
        "log_interval": 1,
        "icmd#level_start_epochs": [1, 2],
        "validation#interval": 2,
        "train#checkpoint#n_saved": 10,  # every epoch's checkpoint kept, to compare model.pt with
    }
    result = run_bundle(bundle, ["train.json"], overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # validated every 2 epochs and on the last weights; the key metric in the log; model.pt the best
    assert "Key metric: val_psnr best value" in result.stdout + result.stderr
    validations = assert_model_is_the_best_validated(bundle)
    assert [r["epoch"] for r in validations] == [2, 3]
    assert all(set(r) >= {"val_psnr", "val_psnr_a", "val_psnr_c", "val_psnr_s"} for r in validations)
    records = read_metrics(bundle)
    assert [r["stage"] for r in records] == [0, 0, 1, 1, 2, 2]
    for r in records:
        assert set(TERMS) <= set(r) and {"epoch", "iteration", "gamma"} <= set(r)
    assert all(r["cmd_c"] == 0 and r["cmd_s"] == 0 for r in records if r["stage"] == 0)
    assert all(r["cmd_c"] > 0 and r["cmd_s"] > 0 for r in records if r["stage"] > 0)
    assert all(r["com"] > 0 and r["int_a"] > 0 and r["int_c"] > 0 for r in records)
    assert (bundle / "models" / "model.pt").is_file() and (bundle / "models" / "checkpoint_3.pt").is_file()
    # resume: two more epochs continue from the saved epoch and stage
    result = run_bundle(bundle, ["train.json"], {**overrides, "epochs": 5})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from checkpoint_3.pt: epoch 3, iteration 6" in result.stdout + result.stderr
    resumed = read_metrics(bundle)[len(records) :]
    assert [(r["epoch"], r["stage"]) for r in resumed] == [(4, 2), (4, 2), (5, 2), (5, 2)]
    # the best of all validations, before and after the resume
    assert [r["epoch"] for r in assert_model_is_the_best_validated(bundle)] == [2, 3, 4, 5]


# --- every switch changes behaviour -----------------------------------------------------------


def parse_train(**overrides):
    parser = ConfigParser()
    parser.read_config(str(TEMPLATE_DIR / "configs" / "train.json"))
    parser.update(
        {
            "architecture#axial": {"width": 16, "groups": 1, "blocks": 1},
            "architecture#planar": {"width": 8, "groups": 1, "blocks": 1},
            **overrides,
        }
    )
    parser["network_def"]["_target_"] = "icmd_auto.bundle_template.scripts.networks.ICMDNet"
    parser["train"]["iteration"]["_target_"] = "icmd_auto.bundle_template.scripts.training.ICMDIteration"
    parser.parse()
    return parser.get_parsed_content("network_def"), parser.get_parsed_content("train#iteration")


def perturb(net):
    """Move off the zero-initialised residual branches, so that the views disagree."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))


def loss_terms(stage=2, **overrides):
    torch.manual_seed(0)
    net, iteration = parse_train(**overrides)
    perturb(net)
    torch.manual_seed(1)
    factor = overrides.get("icmd#factor", 4)
    volume = torch.randn(2, 1, 16, 16, 2 * factor + 1)
    gamma = overrides.get("icmd#gamma", 0.25)
    return net, iteration.losses(net, volume, stage, gamma)


@pytest.fixture(scope="module")
def default_terms():
    return {k: float(v) for k, v in loss_terms()[1].items()}


def changed(terms, default, keys):
    return any(abs(float(terms[k]) - default[k]) > 1e-7 for k in keys)


@pytest.mark.parametrize(
    "overrides, expect",
    [
        ({"icmd#gamma": 1.0}, lambda n, t, d: changed(t, d, ["cmd_c", "cmd_s"])),
        ({"icmd#lambda_cmd": 0.5}, lambda n, t, d: changed(t, d, ["total"]) and not changed(t, d, ["cmd_c"])),
        ({"icmd#lambda_cmd": 0.0}, lambda n, t, d: float(t["cmd_c"]) == 0 == float(t["cmd_s"])),
        ({"icmd#lambda_mem": 0.0}, lambda n, t, d: float(t["com"]) == 0 == float(t["sep"])),
        ({"icmd#cmd_views": ["c"]}, lambda n, t, d: float(t["cmd_s"]) == 0 and float(t["cmd_c"]) > 0),
        ({"icmd#pixel_loss": "l1"}, lambda n, t, d: changed(t, d, ["int_a", "int_c", "int_s"])),
        ({"icmd#use_wavelet": False}, lambda n, t, d: all(float(t[k]) < d[k] for k in ("int_a", "int_c"))),
        ({"icmd#wavelet": "haar"}, lambda n, t, d: changed(t, d, ["int_a", "int_c"])),
        ({"icmd#wavelet_weight": 0.1}, lambda n, t, d: all(float(t[k]) < d[k] for k in ("int_a", "int_c"))),
        (
            {"icmd#use_memory": False},
            lambda n, t, d: n.axial.memory is None and float(t["com"]) == 0 == float(t["sep"]),
        ),
        ({"icmd#mem_items": 4}, lambda n, t, d: n.axial.memory.items.shape[0] == 4),
        ({"icmd#mem_margin": 5.0}, lambda n, t, d: float(t["sep"]) > d["sep"]),
        ({"icmd#mem_reduction": "sum"}, lambda n, t, d: float(t["com"]) > d["com"]),
        ({"icmd#share_cs": False}, lambda n, t, d: n.sagittal is not None and changed(t, d, ["int_s"])),
        ({"icmd#slice_profile": "average"}, lambda n, t, d: changed(t, d, ["int_a", "int_c"])),
        ({"icmd#inplane_pairs": True}, lambda n, t, d: changed(t, d, ["int_c", "int_s"])),
        (
            {"icmd#internal_pairs": False, "icmd#inplane_pairs": True},
            lambda n, t, d: changed(t, d, ["int_c"]) and not changed(t, d, ["int_a"]),
        ),
        (
            {"icmd#views": ["c", "s"], "icmd#fusion": "mean_cs"},
            lambda n, t, d: n.axial is None and float(t["int_a"]) == 0 == float(t["cmd_c"]),
        ),
        ({"icmd#axial_slices": 4}, lambda n, t, d: n.axial.in_slices == 4 and changed(t, d, ["int_a"])),
        ({"icmd#cmd_planes": 2}, lambda n, t, d: changed(t, d, ["cmd_c", "cmd_s"])),
        ({"icmd#factor": 2}, lambda n, t, d: n.factor == 2 and changed(t, d, ["int_a"])),
        (
            {"intensity#clip_low": -0.5, "intensity#mean": 0.0, "intensity#std": 1.0},
            lambda n, t, d: n.coronal.input_window == (-0.5, 1500.0) and changed(t, d, ["int_c"]),
        ),
    ],
    ids=lambda v: ",".join(f"{k}={v}" for k, v in v.items()) if isinstance(v, dict) else "",
)
def test_switch_changes_behaviour(overrides, expect, default_terms):
    net, terms = loss_terms(**overrides)
    assert expect(net, terms, default_terms)


def test_num_levels_one_runs_no_level_two_pass():
    net, iteration = parse_train(**{"icmd#num_levels": 1})
    calls = []
    original = net.coronal_view
    net.coronal_view = lambda v: calls.append(v.shape[-1]) or original(v)
    iteration.losses(net, torch.randn(1, 1, 16, 16, 9), stage=min(2, iteration.num_levels), gamma=0.25)
    distill_calls = [z for z in calls if z >= 9]  # internal pairs use the 3-slice D_r(V)
    assert distill_calls == [9], "level 1 only: G_c upsamples the thick patch once"


def test_cmd_detach_stops_gradients_into_the_axial_network():
    for detach, expect_grad in ((False, True), (True, False)):
        torch.manual_seed(0)
        net, iteration = parse_train(**{"icmd#cmd_detach": detach})
        perturb(net)
        terms = iteration.distillation(net, torch.randn(1, 1, 16, 16, 9), stage=1, gamma=0.5)
        terms["c"].backward()
        grad = sum(p.grad.abs().sum() for p in net.axial.parameters() if p.grad is not None)
        assert (float(grad) > 0) == expect_grad


def test_level_start_epochs_drive_the_stage():
    schedule = scripts.handlers.DistillationSchedule([2, 5], gamma=0.5)
    assert [schedule.stage_at(e) for e in range(7)] == [0, 0, 1, 1, 1, 2, 2]
    assert scripts.handlers.DistillationSchedule([0, 0]).stage_at(0) == 2


def test_schedule_says_when_the_configuration_does_not_distil(caplog):
    from types import SimpleNamespace

    engine = SimpleNamespace(state=SimpleNamespace(epoch=1))
    with caplog.at_level("INFO"):
        scripts.handlers.DistillationSchedule([0, 0], name="off", active=False)(engine)
        scripts.handlers.DistillationSchedule([0, 0], name="on")(
            SimpleNamespace(state=SimpleNamespace(epoch=1))
        )
    assert engine.state.stage == 2 and engine.state.gamma == 0.25
    messages = {r.name: r.getMessage() for r in caplog.records}
    assert messages["off"].startswith("no distillation") and messages["on"].startswith("distillation stage 2")
