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
