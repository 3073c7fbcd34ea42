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
