"""Planner decisions: factor, refusals, memory-driven patch and batch, the time budget, the bundle."""

from __future__ import annotations

import inspect
import json

import pytest
from conftest import CHEST, REPO, requires_shared_data, run_cli, run_main, write_dataset
from monai.bundle import ConfigParser

from icmd_auto import api, plan_measurements, planner, timing
from icmd_auto.dataset import read_dataset_json
from icmd_auto.errors import PlanningError
from icmd_auto.fingerprint import dataset_fingerprint
from icmd_auto.integrity import verify_dataset_integrity
from icmd_auto.planner import PlanOptions, plan_experiment
from icmd_auto.synthetic import ct_phantom, save_nifti


def fingerprint_of(tmp_path, shape, spacing, name="case"):
    path = tmp_path / f"{name}.nii.gz"
    save_nifti(ct_phantom(shape, spacing), spacing, str(path))
    spec = read_dataset_json(write_dataset(tmp_path / "dataset.json", [path]))
    report = verify_dataset_integrity(spec)
    return dataset_fingerprint(report.cases, report.samples, "test")


@pytest.fixture(scope="module")
def thick_fingerprint(tmp_path_factory):
    return fingerprint_of(tmp_path_factory.mktemp("thick"), (96, 96, 20), (1.5, 1.5, 4.5))


def test_factor_three_for_1p5_inplane_4p5_slices(thick_fingerprint):
    plan = plan_experiment(thick_fingerprint, PlanOptions(preset="tiny", memory_gb=4))
    assert plan["factor"]["value"] == 3
    assert "4.5 mm / median in-plane spacing 1.5 mm = 3.00" in plan["factor"]["reason"]
    assert plan["target_spacing_z"]["value"] == pytest.approx(1.5)
    assert all("reason" in v for v in plan.values() if isinstance(v, dict) and "value" in v)


def test_factor_is_clipped_and_can_be_forced(tmp_path):
    fp = fingerprint_of(tmp_path, (64, 64, 12), (0.75, 0.75, 7.5))  # anisotropy 10
    assert plan_experiment(fp, PlanOptions(preset="tiny"))["factor"]["value"] == 6
    forced = plan_experiment(fp, PlanOptions(preset="tiny", factor=2))
    assert forced["factor"]["value"] == 2 and "given" in forced["factor"]["reason"]
    by_target = plan_experiment(fp, PlanOptions(preset="tiny", target_spacing_z=2.5))
    assert by_target["factor"]["value"] == 3


def test_refuses_isotropic_data_without_a_factor(tmp_path):
    fp = fingerprint_of(tmp_path, (48, 48, 40), (1.5, 1.5, 1.5))
    with pytest.raises(PlanningError, match="near-isotropic.*--factor"):
        plan_experiment(fp, PlanOptions(preset="tiny"))


def test_refuses_too_few_slices_for_the_factor(tmp_path):
    fp = fingerprint_of(tmp_path, (48, 48, 4), (1.0, 1.0, 5.0))
    with pytest.raises(PlanningError, match="too few slices for factor 5.*case.nii.gz \\(4 slices\\)"):
        plan_experiment(fp, PlanOptions(preset="tiny"))


def test_patch_and_batch_shrink_with_the_memory_budget(thick_fingerprint):
    large = plan_experiment(thick_fingerprint, PlanOptions(preset="small", memory_gb=8))
    small = plan_experiment(thick_fingerprint, PlanOptions(preset="small", memory_gb=0.15))
    size = lambda p: p["patch_size"]["value"][0] ** 2 * p["batch_size"]["value"]  # noqa: E731
    assert size(small) < size(large)
    assert "0.15 GB budget" in small["patch_size"]["reason"]
    with pytest.raises(PlanningError, match="memory budget .* too small"):
        plan_experiment(thick_fingerprint, PlanOptions(preset="small", memory_gb=0.001))


def test_time_budget_sizes_the_schedule(thick_fingerprint):
    def planned(minutes, seconds=None):
        options = PlanOptions(
            preset="tiny", memory_gb=2, time_budget_min=minutes, seconds_per_iteration=seconds
        )
        return plan_experiment(thick_fingerprint, options)

    # with the seconds per iteration given, the schedule follows from the budget alone (no machine load)
    short, long = planned(0.5, 0.05), planned(5, 0.05)
    total = lambda p: p["training"]["value"]["epochs"] * p["training"]["value"]["iterations_per_epoch"]  # noqa: E731
    assert total(short) == 370 and total(long) == 5500, "18.5 s and 275 s of training at 0.05 s"
    assert short["training"]["value"]["time_limit_s"] == 30
    assert "0.05 s per iteration" in short["training"]["reason"]
    measured = planned(0.5)["seconds_per_iteration"]
    assert measured["value"] > 0 and "timing probe" in measured["reason"]
    assert measured["machine"] == timing.machine_description()
    raw = measured["timings"]["seconds"]
    assert set(raw) == {str(n) for n in timing.thread_candidates()}, "every candidate thread count timed"
    assert all(len(steps) == timing.TIMED_STEPS for per_stage in raw.values() for steps in per_stage.values())


@requires_shared_data
def test_plan_command_on_thickened_chest(tmp_path, chest_x3):
    dataset = write_dataset(tmp_path / "dataset.json", [chest_x3])
    work = tmp_path / "work"
    result = run_cli("plan", "--dataset", str(dataset), "--work", str(work), "--preset", "tiny")
    assert result.returncode == 0, result.stderr
    plans = json.loads((work / "plans.json").read_text())
    assert plans["factor"]["value"] == 3 and "reason" in plans["factor"]
    fingerprint = json.loads((work / "fingerprint.json").read_text())
    assert fingerprint["cases"][0]["spacing"] == [1.5, 1.5, 4.5]
    for name in ("metadata", "train", "inference", "evaluate"):
        parser = ConfigParser()
        parser.read_config(str(work / "bundle" / "configs" / f"{name}.json"))
        parser.parse()
    train = json.loads((work / "bundle" / "configs" / "train.json").read_text())
    assert train["icmd"]["factor"] == 3 and train["datalist"] == [str(chest_x3)]
    meta = json.loads((work / "bundle" / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["upsampling_factor_z"] == 3


@requires_shared_data
def test_plan_command_refuses_the_isotropic_original(tmp_path):
    dataset = write_dataset(tmp_path / "dataset.json", [CHEST])
    result = run_cli("plan", "--dataset", str(dataset), "--work", str(tmp_path / "work"))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "near-isotropic" in lines[0] and "--factor" in lines[0]
    assert not (tmp_path / "work").exists()


def test_plan_api_writes_bundle_for_a_forced_factor(tmp_path):
    path = tmp_path / "iso.nii.gz"
    save_nifti(ct_phantom((48, 48, 30), (1.0, 1.0, 1.0)), (1.0, 1.0, 1.0), str(path))
    plans = api.plan(
        write_dataset(tmp_path / "dataset.json", [path], factor=2), tmp_path / "work", preset="tiny"
    )
    assert plans["factor"]["value"] == 2
    inference = json.loads((tmp_path / "work" / "bundle" / "configs" / "inference.json").read_text())
    assert inference["icmd"]["factor"] == 2


def test_recipe_default_is_the_measured_one_and_icmd_gives_the_papers_method(tmp_path):
    path = tmp_path / "thick.nii.gz"
    save_nifti(ct_phantom((48, 48, 12), (1.0, 1.0, 3.0)), (1.0, 1.0, 3.0), str(path))
    dataset = write_dataset(tmp_path / "dataset.json", [path])
    default = api.plan(dataset, tmp_path / "default", preset="tiny")
    assert default["recipe"]["value"] == planner.DEFAULT_RECIPE == "inplane"
    assert planner.RECIPE_EVIDENCE["record"] in default["recipe"]["reason"]
    train = json.loads((tmp_path / "default" / "bundle" / "configs" / "train.json").read_text())
    assert train["icmd"]["views"] == ["c", "s"] and train["icmd"]["inplane_pairs"] is True
    assert train["icmd"]["lambda_cmd"] == 0.0 and train["icmd"]["fusion"] == "mean_cs"

    paper = api.plan(dataset, tmp_path / "paper", preset="tiny", recipe="icmd", method={"gamma": 0.5})
    assert paper["recipe"]["value"] == "icmd" and "given" in paper["recipe"]["reason"]
    train = json.loads((tmp_path / "paper" / "bundle" / "configs" / "train.json").read_text())
    assert train["icmd"]["views"] == ["a", "c", "s"] and train["icmd"]["fusion"] == "mean3"
    assert train["icmd"]["lambda_cmd"] == 0.15 and train["icmd"]["gamma"] == 0.5

    result = run_cli("plan", "--dataset", str(dataset), "--work", str(tmp_path / "x"), "--recipe", "seed")
    assert result.returncode == 1 and "unknown recipe 'seed'" in result.stderr.strip().splitlines()[-1]


def test_recipe_reason_cites_rows_of_the_benchmark_record_that_support_it():
    """The default recipe's reason names rows of docs/results.json, and what it says of them holds there."""
    evidence = planner.RECIPE_EVIDENCE
    record = json.loads((REPO / evidence["record"]).read_text())
    rows = record["results"][evidence["volume"]][str(evidence["factor"])]
    default = rows[evidence["default"]]["psnr_syn"]
    others = [name for name in rows if name.startswith(evidence["others"])]
    assert evidence["paper"] in others and evidence["closest"] in others
    assert all(default > rows[name]["psnr_syn"] for name in others), "the default beats them all"
    reason = planner.DEFAULT_RECIPE_REASON
    for name in (evidence["record"], evidence["default"], evidence["paper"], evidence["closest"]):
        assert name in reason
    assert "dB" not in reason, "figures live in the record, not in the code"


def _timing(seconds: float):
    """timing.training_step_timings on a machine where a float32 step takes ``seconds`` (bf16 twice that)."""
    return lambda *args, amp=False, repeats=timing.TIMED_STEPS, **kwargs: (
        [seconds * (2 if amp else 1)] * repeats
    )


def _run_costs(seconds: float):
    """plan_measurements.training_run_costs on a machine where an iteration of the real loop costs
    just its step (``seconds``) and nothing else costs time."""
    return lambda values, threads: {
        "startup": 0.0,
        "load": 0.0,
        "iteration": seconds,
        "epoch": 0.0,
        "validation": 0.0,
    }


def test_recorded_seconds_per_iteration_give_the_same_plan_on_a_busy_machine(tmp_path, monkeypatch, capfd):
    path = tmp_path / "thick.nii.gz"
    save_nifti(ct_phantom((48, 48, 12), (1.0, 1.0, 3.0)), (1.0, 1.0, 3.0), str(path))
    dataset = write_dataset(tmp_path / "dataset.json", [path])
    options = {"preset": "tiny", "memory_gb": 2, "time_budget_min": 1}
    monkeypatch.setattr(timing, "training_step_timings", _timing(0.01))
    monkeypatch.setattr(plan_measurements, "training_run_costs", _run_costs(0.01))
    idle = api.plan(dataset, tmp_path / "idle", **options)
    recorded = idle["seconds_per_iteration"]
    assert recorded["value"] == 0.01 and recorded["machine"] == timing.machine_description()
    assert recorded["timings"]["warmup_steps"] == timing.WARMUP_STEPS
    assert idle["threads"]["value"] == recorded["threads"] == max(timing.thread_candidates())

    monkeypatch.setattr(timing, "training_step_timings", _timing(0.05))  # the same machine, busy
    monkeypatch.setattr(plan_measurements, "training_run_costs", _run_costs(0.05))
    busy = api.plan(dataset, tmp_path / "busy", **options)
    total = lambda p: p["training"]["value"]["epochs"] * p["training"]["value"]["iterations_per_epoch"]  # noqa: E731
    assert total(busy) < total(idle), "measured on a busy machine, the plan has fewer iterations"

    result = run_main(
        capfd, "plan", "--dataset", str(dataset), "--work", str(tmp_path / "again"), "--preset", "tiny",
        "--memory_gb", "2", "--time_budget_min", "1", "--seconds_per_iteration", str(recorded["value"]),
        "--threads", str(idle["threads"]["value"]),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "0.01 s per iteration (given)" in result.stdout
    again = json.loads((tmp_path / "again" / "plans.json").read_text())
    assert again["seconds_per_iteration"] == {
        "value": 0.01,
        "machine": None,
        "reason": "given (--seconds_per_iteration): no timing probe",
    }
    values = lambda p: {k: v["value"] for k, v in p.items() if isinstance(v, dict) and "value" in v}  # noqa: E731
    assert values(again) == values(idle), "the plan made on the idle machine, decision for decision"
    for config in ("train.json", "inference.json"):
        assert (tmp_path / "again" / "bundle" / "configs" / config).read_text() == (
            tmp_path / "idle" / "bundle" / "configs" / config
        ).read_text()


def test_a_planned_run_trains_its_planned_epochs_within_the_budget(tmp_path, capfd):
    """The seconds per iteration the plan sizes the schedule by include what a run spends beyond the
    step (start-up, reading the volumes, data loading, handlers, checkpoints, validation): the run
    trains every planned iteration inside the budget, its cosine learning rate annealed to the end,
    and `train` prints the planned and the real seconds that plans.json records."""
    import torch

    path = tmp_path / "thick.nii.gz"
    save_nifti(ct_phantom((64, 64, 24), (1.0, 1.0, 3.0)), (1.0, 1.0, 3.0), str(path))
    budget_min = 0.5
    plans = api.plan(
        write_dataset(tmp_path / "dataset.json", [path]), tmp_path / "work", preset="tiny", memory_gb=2,
        time_budget_min=budget_min,
    )  # fmt: skip
    costs = plans["seconds_per_iteration"]["costs"]
    assert plans["seconds_per_iteration"]["value"] > costs["step"], (
        "the run's iteration costs more than its step"
    )
    result = run_main(capfd, "train", "--work", str(tmp_path / "work"))
    assert result.returncode == 0, result.stderr
    run = json.loads((tmp_path / "work" / "plans.json").read_text())["runs"][-1]
    planned, real = run["planned"], run["real"]
    assert (real["epochs"], real["iterations"]) == (planned["epochs"], planned["iterations"]), run
    # the whole training process, start-up included, within the budget (10% for the machine's noise)
    assert real["seconds"] <= 1.1 * budget_min * 60, run
    assert f"planned: {planned['epochs']} epochs, {planned['iterations']} iterations in" in result.stdout
    assert f"trained: {real['epochs']} epochs, {real['iterations']} iterations in" in result.stdout
    last = torch.load(
        tmp_path / "work" / "bundle" / "models" / f"checkpoint_{planned['epochs']}.pt", weights_only=False
    )
    lr = last["optimizer"]["param_groups"][0]["lr"]
    assert lr < 0.01 * plans["training"]["value"]["learning_rate"], "the cosine schedule ran to its end"


def test_every_option_is_in_help_with_its_choices(capfd):
    from icmd_auto import cli
    from icmd_auto.template import scripts

    for name, command in cli.COMMANDS.items():
        result = run_main(capfd, name, "--help")
        shown = result.stdout + result.stderr  # fire writes help to stderr where it is not a terminal
        assert "SYNOPSIS" in shown, shown
        assert "--debug" in shown and "--quiet" in shown, name
        params = [p for p in inspect.signature(command).parameters.values() if p.kind != p.VAR_KEYWORD]
        for p in params:
            assert f"--{p.name}" in shown or p.name.upper() in shown, (name, p.name)
        documented = cli._option_help().get("import_bundle" if name == "import" else name, {})
        if name not in ("pretrain", "version"):
            assert {p.name for p in params} <= set(documented), (
                name,
                {p.name for p in params} - set(documented),
            )
        for text in documented.values():
            assert text in " ".join(shown.split()), (name, text)
    plan_help = " ".join(run_main(capfd, "plan", "--help").stderr.split())
    for choices in (planner.PRESETS, planner.RECIPES, scripts.degradation.PROFILES):
        assert " | ".join(choices) in plan_help
    assert "--output_dtype" in run_main(capfd, "predict", "--help").stderr


def test_plan_logs_each_decision_as_it_is_made(tmp_path, capfd):
    path = tmp_path / "thick.nii.gz"
    save_nifti(ct_phantom((48, 48, 12), (1.0, 1.0, 3.0)), (1.0, 1.0, 3.0), str(path))
    dataset = write_dataset(tmp_path / "dataset.json", [path])
    result = run_main(
        capfd, "plan", "--dataset", str(dataset), "--work", str(tmp_path / "w"), "--preset", "tiny"
    )
    assert result.returncode == 0, result.stderr
    plans = json.loads((tmp_path / "w" / "plans.json").read_text())
    decisions = [k for k, v in plans.items() if isinstance(v, dict) and "reason" in v]
    lines = result.stderr.splitlines()
    logged = [next(i for i, line in enumerate(lines) if line.startswith(f"{key}: ")) for key in decisions]
    assert logged == sorted(logged), "one line per decision, in the order they are made"
    assert lines[logged[0]] == f"factor: 3 ({plans['factor']['reason']})"
    quiet = run_main(
        capfd, "plan", "--dataset", str(dataset), "--work", str(tmp_path / "q"), "--preset", "tiny", "--quiet"
    )
    assert quiet.returncode == 0 and "factor: " not in quiet.stderr


@pytest.mark.parametrize("recipe", sorted(planner.RECIPES))
def test_the_planner_builds_the_network_the_bundle_config_builds(recipe):
    """One home for a method's network: planner.build_network (and pretraining) go through the
    bundle's ICMDNet.from_config, which must give what train.json's network_def gives."""
    from icmd_auto import runner
    from icmd_auto.template import TEMPLATE_DIR

    parser = ConfigParser()
    parser.read_config(str(TEMPLATE_DIR / "configs" / "train.json"))
    preset = planner.PRESETS["small"]
    icmd = {**parser["icmd"], **planner.RECIPES[recipe]}
    parser.update(
        {
            **runner.private_targets(TEMPLATE_DIR, ["train.json"]),
            "icmd": icmd,
            "architecture": {"axial": preset.axial, "planar": preset.planar},
        }
    )
    configured = parser.get_parsed_content("network_def")
    built = planner.build_network(icmd["factor"], preset, planner.RECIPES[recipe])
    shapes = lambda net: {k: tuple(v.shape) for k, v in net.state_dict().items()}  # noqa: E731
    assert shapes(built) == shapes(configured)
    assert (built.views, built.fusion, built.sagittal is None) == (
        configured.views,
        configured.fusion,
        configured.sagittal is None,
    )
