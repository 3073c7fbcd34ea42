"""Self-supervised validation and mixed precision: held-out slices, validation PSNR, the best model,
a validation schedule sized to the budget, and SupervisedTrainer's ``amp`` in the ICMD iteration."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.engines import SupervisedEvaluator
from monai.handlers import PeakSignalToNoiseRatio, from_engine
from monai.inferers import SimpleInferer

from icmd_auto import plan_measurements, planner, runner
from icmd_auto.planner import PlanOptions, plan_experiment
from icmd_auto.synthetic import save_nifti
from icmd_auto.template import TEMPLATE_DIR, scripts

TINY = {"width": 8, "groups": 1, "blocks": 1}


def slice_index_volume(path, shape=(24, 20, 16)):
    """A volume whose slice k is 100 * k - 1000 HU everywhere: a value tells which slice it came from."""
    data = np.broadcast_to((100.0 * np.arange(shape[2]) - 1000.0).astype(np.float32), shape).copy()
    save_nifti(data, (1.0, 1.0, 3.0), str(path))
    return path


def template_config(tmp_path, key, volume, **overrides):
    """A component of the template's train.json, built for ``volume`` (files go under tmp_path)."""
    values = {
        "datalist": [str(volume)],
        "ckpt_dir": str(tmp_path / "models"),
        "log_dir": str(tmp_path / "logs"),
        "icmd#factor": 3,
        "validation#holdout_slices": 3,
        "architecture#axial": {"width": 16, "groups": 1, "blocks": 1},
        "architecture#planar": TINY,
        "patch_size": [16, 16, 7],
        "batch_size": 4,
        **overrides,
    }
    return runner.config_value(TEMPLATE_DIR, ["train.json"], key, **values)


def slices_of(image: torch.Tensor) -> set[int]:
    """The slice indices a standardised patch of slice_index_volume holds (template intensity)."""
    hu = torch.as_tensor(image) * 550.0 - 350.0
    return {int(k) for k in torch.round((hu + 1000.0) / 100.0).unique()}


def test_held_out_slices_never_reach_a_training_patch_and_form_the_validation_item(tmp_path):
    volume = slice_index_volume(tmp_path / "ramp.nii.gz")
    train = template_config(tmp_path, "train#dataset", volume)
    seen = set()
    for _ in range(30):
        for patch in train[0]:
            seen |= slices_of(patch["image"])
    assert seen == set(range(13)), "patches come from slices 0..12 only, the last training slice included"
    (item,) = template_config(tmp_path, "validate#dataset", volume)
    assert item["image"].shape == (1, 24, 20, 4)
    assert [slices_of(item["image"][..., k]) for k in range(4)] == [{12}, {13}, {14}, {15}]


def test_validation_leaves_every_random_stream_of_training_untouched(tmp_path):
    volume = slice_index_volume(tmp_path / "ramp.nii.gz")
    evaluator = template_config(tmp_path, "validate#evaluator", volume)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    evaluator.run(1)
    assert torch.equal(before[0], torch.get_rng_state())
    assert np.array_equal(before[1], np.random.get_state()[1]) and before[2] == random.getstate()
    assert set(evaluator.state.metrics) == {"val_psnr", "val_psnr_a", "val_psnr_c", "val_psnr_s"}
    assert (tmp_path / "models" / "model.pt").is_file(), "the first validation is the best so far"


@pytest.mark.parametrize("fusion, views", [("mean_cs", ("c", "s")), ("mean3", ("a", "c", "s"))])
def test_untrained_networks_score_what_linear_interpolation_scores(fusion, views):
    """Fresh view networks are linear interpolation (zero residual): the validation pairs must score
    exactly as linear interpolation does on the held-out slices, each view along its own axis."""
    r, mean, std = 3, -350.0, 550.0
    net = scripts.networks.ICMDNet(
        r, views=views, fusion=fusion, axial={"width": 16, "groups": 1, "blocks": 1}, planar=TINY
    )
    validation = scripts.validation.SelfSupervisedValidation(r, fusion, mean, std)
    engine = SimpleNamespace(state=SimpleNamespace(device=torch.device("cpu")), network=net, amp=False)
    torch.manual_seed(0)
    item = torch.randn(1, 1, 16, 13, r + 1)
    out = validation(engine, {"image": item})
    assert [o["view"] for o in out] == list(views)
    unit = lambda x: scripts.evaluation.to_unit(x * std + mean)  # noqa: E731
    held = item[0, 0, :, :, 1:].permute(2, 0, 1)  # the held-out axial slices, (h, X, Y)
    layouts = {  # each view's planes (degraded along their last axis) and the output's layout
        "c": (held, lambda t: t),  # G_c: along y
        "s": (held.transpose(1, 2), lambda t: t),  # G_s: along x
        "a": (item[0, 0], lambda t: t.permute(2, 0, 1)),  # G_a: the training slice and the held-out ones
    }
    for o in out:
        planes, layout = layouts[o["view"]]
        target = planes[..., : (planes.shape[-1] - 1) // r * r + 1]
        syn = scripts.evaluation.synthesized_mask(target.shape[-1], r)
        linear = scripts.evaluation.interpolate_z(target[..., ::r], r, "linear")
        assert torch.equal(o["label"][0], layout(unit(target[..., syn])))
        assert torch.allclose(o["pred"][0], layout(unit(linear[..., syn])), atol=1e-6)


def psnr_evaluator(net, saver, scores: dict[int, float]) -> SupervisedEvaluator:
    """An evaluator whose key metric is ``scores[epoch]`` dB, and whose network weights are the epoch."""

    def step(engine, batch):
        net.weight.data.fill_(float(engine.state.epoch))
        label = torch.zeros(1, 4, 4)
        return [{"pred": label + 10 ** (-scores[engine.state.epoch] / 20), "label": label}]

    metric = PeakSignalToNoiseRatio(max_val=1.0, output_transform=from_engine(["pred", "label"]))
    return SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=[{"image": torch.zeros(1)}],
        network=net,
        iteration_update=step,
        key_val_metric={"val_psnr": metric},
        val_handlers=[saver],
        decollate=False,
    )


def test_best_model_saver_keeps_the_best_weights_across_a_resume(tmp_path):
    net = torch.nn.Linear(1, 1, bias=False)
    saver = scripts.handlers.BestModelSaver(str(tmp_path), {"model": net})
    evaluator = psnr_evaluator(net, saver, {1: 20.0, 2: 30.0, 3: 25.0})
    for epoch in (1, 2, 3):
        evaluator.run(epoch)
    saved = lambda: float(torch.load(tmp_path / "model.pt", weights_only=True)["weight"])  # noqa: E731
    assert saved() == 2.0, "model.pt holds the weights of the best validation, not the last"
    state = saver.state_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]

    # a resumed run: a new saver and evaluator, the tracking state loaded from the checkpoint
    resumed = scripts.handlers.BestModelSaver(str(tmp_path), {"model": net})
    evaluator = psnr_evaluator(net, resumed, {4: 28.0, 5: 31.0})
    resumed.load_state_dict(state)
    assert evaluator.state.best_metric == pytest.approx(30.0) and evaluator.state.best_metric_epoch == 2
    evaluator.run(4)
    assert saved() == 2.0, "28 dB after the resume does not replace the 30 dB model found before it"
    evaluator.run(5)
    assert saved() == 5.0 and evaluator.state.best_metric_epoch == 5


def inplane_training(amp: bool, scaler=None):
    torch.manual_seed(0)
    net = scripts.networks.ICMDNet(3, views=("c", "s"), fusion="mean_cs", planar=TINY)
    iteration = scripts.training.ICMDIteration(
        3, internal_pairs=False, inplane_pairs=True, lambda_cmd=0.0, lambda_mem=0.0
    )
    engine = SimpleNamespace(
        state=SimpleNamespace(device=torch.device("cpu"), stage=0, gamma=0.25),
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-3),
        inferer=SimpleInferer(),
        amp=amp,
        amp_kwargs={},
        scaler=scaler,
    )
    return net, iteration, engine


def test_the_iteration_honours_the_trainers_amp():
    """bf16 autocast on a CPU with amp, none without: the dtype the networks' convolutions compute in."""
    for amp, expected in ((False, torch.float32), (True, torch.bfloat16)):
        net, iteration, engine = inplane_training(amp)
        seen = set()
        conv = next(m for m in net.coronal.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda m, i, o, seen=seen: seen.add(o.dtype))
        out = iteration(engine, {"image": torch.randn(2, 1, 16, 16, 7)})
        assert np.isfinite(out["loss"]) and seen == {expected}


def test_a_gradient_scaler_is_used_and_unscales_before_the_step():
    """SupervisedTrainer gives the engine a GradScaler with amp (active on CUDA): the loss is scaled
    for backward, and the update is the unscaled one (a power-of-2 scale is exact)."""
    volume = torch.randn(2, 1, 16, 16, 7)
    plain, iteration, engine = inplane_training(False)
    iteration(engine, {"image": volume.clone()})
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    calls = []
    original = scaler.scale
    scaler.scale = lambda loss: calls.append(float(loss)) or original(loss)
    scaled, iteration, engine = inplane_training(False, scaler)
    iteration(engine, {"image": volume.clone()})
    assert len(calls) == 1 and scaler.get_scale() == 2.0**12
    for a, b in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(a, b)


def test_template_takes_amp_from_one_key_that_defaults_to_cuda_and_bf16():
    config = runner.config_value(TEMPLATE_DIR, ["train.json"], "amp")
    assert config is torch.cuda.is_available()
    train = json.loads((TEMPLATE_DIR / "configs" / "train.json").read_text())
    assert train["amp"] == "$torch.cuda.is_available()"
    for engine in (train["train"]["trainer"], train["validate"]["evaluator"]):
        assert engine["amp"] == "@amp" and engine["amp_kwargs"] == {"dtype": "$getattr(torch, @amp_dtype)"}
    assert runner.config_value(TEMPLATE_DIR, ["train.json"], "train#trainer#amp_kwargs") == {
        "dtype": torch.bfloat16
    }


# --- the planner ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fingerprint(tmp_path_factory):
    from test_planner import fingerprint_of

    return fingerprint_of(tmp_path_factory.mktemp("thick"), (64, 64, 20), (1.5, 1.5, 4.5))


def test_planner_holds_out_r_slices_and_sizes_the_validation_interval_to_its_cost(fingerprint, monkeypatch):
    plan = plan_experiment(fingerprint, PlanOptions(preset="tiny", memory_gb=2, epochs=20))
    assert plan["validation"]["value"]["holdout_slices"] == 3
    assert (
        plan["patch_size"]["value"][2] == 7 and "% of the 40 training steps" in plan["validation"]["reason"]
    )
    # 3% of 40 training steps is 1.2 steps: a validation costing 1% of a step fits every epoch, one
    # costing 30% fits 4 times in 20 epochs, a dearer one runs once, at the end
    monkeypatch.setattr(plan_measurements, "training_step_flops", lambda *a: 1.0)
    schedule = {"epochs": 20, "iterations_per_epoch": 2}
    for cost, interval in ((0.01, 1), (0.3, 5), (100.0, 20)):
        monkeypatch.setattr(plan_measurements, "validation_flops", lambda *a, c=cost: c)
        value, reason = planner.decide_validation(
            None, None, None, [16, 16, 7], 2, 0, [[64, 64, 20]], 3, "held out", schedule
        )
        assert value == {"holdout_slices": 3, "interval": interval}, reason


def test_planner_validates_nothing_when_the_volumes_cannot_spare_the_slices(tmp_path):
    from test_planner import fingerprint_of

    plan = plan_experiment(fingerprint_of(tmp_path, (48, 48, 9), (1.0, 1.0, 3.0)), PlanOptions(preset="tiny"))
    assert plan["validation"]["value"]["holdout_slices"] == 0
    assert plan["validation"]["reason"].startswith("no validation: the smallest case has 9 thick slices")


def test_planner_turns_amp_on_for_cuda_and_for_a_cpu_only_where_bf16_is_measured_faster(
    fingerprint, monkeypatch
):
    net = planner.build_network(3, planner.PRESETS["tiny"])
    iteration = planner.build_iteration(3, 4)
    on, reason = planner.decide_amp(net, iteration, [16, 16, 7], 2, cuda=True)
    assert on and "amp_dtype" in reason
    # bf16 on a GPU that has it (fp16 overflowed in the paper preset), fp16 and its GradScaler on older ones
    assert planner.decide_amp_dtype(cuda=True, bf16_supported=True)[0] == "bfloat16"
    assert planner.decide_amp_dtype(cuda=True, bf16_supported=False) == (
        "float16",
        "fp16 with SupervisedTrainer's GradScaler: this GPU has no bf16",
    )
    assert planner.decide_amp_dtype(cuda=False, bf16_supported=False)[0] == "bfloat16"
    # where bf16 convolutions are slower, the training-step probe is not even run
    monkeypatch.setattr(plan_measurements, "conv_probe_seconds", lambda dtype: 0.05 if dtype is None else 0.4)
    on, reason = planner.decide_amp(net, iteration, [16, 16, 7], 2, cuda=False)
    assert on is False and "3x3-conv probe ran in 400 ms with bf16 autocast against 50 ms" in reason
    monkeypatch.setattr(
        plan_measurements, "conv_probe_seconds", lambda dtype: 0.05 if dtype is None else 0.02
    )
    for bf16, expect in ((0.5, True), (1.1, False), (8.0, False)):
        monkeypatch.setattr(
            plan_measurements, "training_step_timings", lambda *a, amp=False, b=bf16, **k: [b if amp else 1.0]
        )
        on, reason = planner.decide_amp(net, iteration, [16, 16, 7], 2, cuda=False)
        assert on is expect, reason
        assert f"took {bf16:.3g} s with bf16 autocast against 1 s in float32 on this CPU" in reason
