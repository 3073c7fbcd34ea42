"""The planner's timing probe (icmd_auto/timing.py): warm-up steps untimed, the median of the rest,
on the training device, at the fastest CPU thread count."""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from icmd_auto import timing


class SlowFirstStep(torch.nn.Module):
    """A one-conv network whose first forward (over all copies) sleeps ``delay`` seconds, as the
    first step on CUDA pays for the context, cuDNN autotuning and the allocator."""

    calls = 0

    def __init__(self, delay: float):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, 3, padding=1)
        self.delay = delay

    def forward(self, volume, objective):
        SlowFirstStep.calls += 1
        if SlowFirstStep.calls == 1:
            time.sleep(self.delay)
        return objective(self, volume)


ITERATION = SimpleNamespace(
    gamma=0.0, losses=lambda net, v, stage, gamma: {"total": net.conv(v).square().mean()}
)


def test_a_slow_first_step_does_not_reach_the_timing():
    SlowFirstStep.calls = 0
    net = SlowFirstStep(delay=0.5)
    probe = timing.probe_training_step(net, ITERATION, [8, 8, 4], 1, [0])
    assert probe["device"] == "cpu" and probe["threads"] in timing.thread_candidates()
    assert probe["per_stage"][0] < 0.1, probe
    steps = [t for per_stage in probe["timings"].values() for t in per_stage["0"]]
    assert len(steps) == timing.TIMED_STEPS * len(timing.thread_candidates())
    assert max(steps) < 0.25, "the slow step was a warm-up step, not a timed one"
    # without warm-up the same probe would time it: the test can tell the difference
    SlowFirstStep.calls = 0
    assert max(timing.training_step_timings(net, ITERATION, [8, 8, 4], 1, 0, warmup=0)) >= 0.5


def test_the_probe_keeps_the_network_and_the_callers_threads():
    net = SlowFirstStep(delay=0.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    threads = torch.get_num_threads()
    timing.probe_training_step(net, ITERATION, [8, 8, 4], 2, [0, 1])
    assert torch.get_num_threads() == threads
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "a copy is trained"


def test_thread_candidates():
    assert timing.thread_candidates(16) == [16, 8, 1]
    assert timing.thread_candidates(2) == [2, 1]
    assert timing.thread_candidates(1) == [1]


def test_the_gpu_batch_doubles_while_samples_per_second_grow(monkeypatch):
    """planner.decide_device_batch on a device where a step costs 0.1 s + 1 ms per sample: samples/s
    grow by more than 10% up to batch 512 (the cap), and stop at the memory bound where it is lower."""
    from icmd_auto import plan_measurements, planner

    calls = []

    def step(net, iteration, patch, batch, stage, device=None, amp=False, warmup=2, repeats=5):
        calls.append(batch)
        return [0.1 + 0.001 * batch] * repeats

    monkeypatch.setattr(plan_measurements, "training_step_timings", step)
    batch, reason = planner.decide_device_batch(None, None, [64, 64, 9], 8, 10_000, 2, "memory")
    assert batch == planner.GPU_BATCH_MAX and calls == [8, 16, 32, 64, 128, 256, 512]
    assert "batch 512: 837" in reason
    calls.clear()
    assert planner.decide_device_batch(None, None, [64, 64, 9], 8, 100, 2, "memory")[0] == 64
    # a device that is saturated at once keeps the memory decision's batch
    monkeypatch.setattr(
        plan_measurements, "training_step_timings", lambda *a, repeats=5, **k: [0.01 * a[3]] * repeats
    )
    assert planner.decide_device_batch(None, None, [64, 64, 9], 8, 10_000, 2, "memory")[0] == 8


def test_cached_volumes_go_to_the_training_device():
    """train.json's cache_on_device: the last cached transform puts the volume on ``device``."""
    from monai.bundle import ConfigParser

    from icmd_auto.template import TEMPLATE_DIR

    parser = ConfigParser()
    parser.read_config(str(TEMPLATE_DIR / "configs" / "train.json"))
    key = "train#preprocessing#transforms#3"
    assert parser[key]["_target_"] == "EnsureTyped" and parser["train#preprocessing#transforms#4"][
        "_target_"
    ].startswith("Rand"), "the last transform CacheDataset caches"
    parser.update({"cache_on_device": True, "device": "$torch.device('cpu')"})
    ensure = parser.get_parsed_content(key)
    out = ensure({"image": torch.zeros(1, 4, 4, 3, dtype=torch.int16)})["image"]
    assert (
        ensure.converter.device == torch.device("cpu")
        and out.device.type == "cpu"
        and out.dtype == torch.float32
    )
    parser.update({"cache_on_device": False})
    parser.parse()
    assert parser.get_parsed_content(key).converter.device is None


def test_one_home_for_precision_and_threads():
    """Training, validation, inference and the planner take autocast and the core count from the
    bundle's scripts/runtime.py (the bundle runs without icmd_auto), not from copies."""
    from icmd_auto.template import scripts

    runtime = scripts.runtime
    assert timing.autocast is runtime.autocast and timing.cpu_cores is runtime.cpu_cores
    assert timing.torch_threads is runtime.torch_threads
    assert scripts.training.autocast is runtime.autocast and scripts.validation.autocast is runtime.autocast
    assert scripts.inferers.autocast is runtime.autocast and scripts.inferers.cpu_cores is runtime.cpu_cores
    assert scripts.io.cpu_cores is runtime.cpu_cores


def test_autocast_computes_in_the_precision_asked_for():
    from icmd_auto.template import scripts

    runtime = scripts.runtime
    conv = torch.nn.Conv2d(1, 2, 3)
    x = torch.randn(1, 1, 8, 8)
    for precision, expected in (
        (None, torch.float32),
        (False, torch.float32),
        ("", torch.float32),
        (True, torch.bfloat16),  # a CPU's own: bf16
        ("bf16", torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
        ("fp32", torch.float32),
    ):
        with runtime.autocast("cpu", precision):
            assert conv(x).dtype == expected, precision
    assert runtime.autocast_dtype("cpu", "fp16") == torch.float16
    try:
        runtime.autocast("cpu", "int8")
    except ValueError as e:
        assert "precision must be one of" in str(e)
    else:
        raise AssertionError("an unknown precision is refused")
    # the trainer's amp: MONAI's amp and amp_kwargs on the engine
    engine = SimpleNamespace(amp=True, amp_kwargs={"dtype": torch.bfloat16})
    assert scripts.training.engine_precision(engine) == torch.bfloat16
    assert scripts.training.engine_precision(SimpleNamespace(amp=False)) is None
    assert scripts.training.engine_precision(SimpleNamespace(amp=True, amp_kwargs={})) is True
