"""Losses against hand computations and pywavelets; T(gamma); memory losses; level densities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pywt
import torch

from icmd_auto.template import scripts

losses = scripts.losses


@pytest.mark.parametrize("shape", [(32, 32), (9, 33), (64, 9), (5, 7)])
def test_dwt_matches_pywavelets_wavedec2(shape):
    x = np.random.default_rng(0).normal(size=shape)
    reference = pywt.wavedec2(x, "db3", mode="symmetric", level=3)
    ours = losses.DWT2D("db3", 3)(torch.tensor(x, dtype=torch.float64)[None, None])
    for t in range(3):
        bands = ours[t][0].numpy()
        expected = reference[3 - t]  # wavedec2 lists the coarsest level first
        for band in expected:  # each of pywt's (cH, cV, cD) is one of our three bands
            assert min(np.abs(b - band).max() for b in bands) < 1e-6


def test_wavelet_loss_zero_for_identical_and_hand_value_for_a_pattern():
    loss = losses.WaveletHighFrequencyLoss("db3")
    a = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    assert loss(a, a.clone()).item() == 0.0
    # a known pattern: a vertical edge against zeros; the hand value from pywt's coefficients
    edge = np.zeros((16, 16))
    edge[:, 8:] = 1.0
    expected = sum(
        np.mean(np.concatenate([c.ravel() for c in level]) ** 2)
        for level in pywt.wavedec2(edge, "db3", mode="symmetric", level=3)[1:]
    )
    got = loss(torch.tensor(edge)[None, None], torch.zeros(1, 1, 16, 16, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("gamma", [0.1, 0.25, 0.5, 1.0])
def test_agreement_mask_keeps_the_fraction_that_agrees_best(gamma):
    diff = torch.rand(4, 1, 8, 8, 5)
    mask = losses.agreement_mask(diff, gamma)
    assert mask.sum().item() == math.ceil(gamma * diff.numel())
    if gamma < 1:
        assert diff[mask].max() <= diff[~mask].min()


def test_cross_view_distillation_averages_the_selected_squares():
    axial = torch.zeros(1, 1, 1, 1, 5)
    other = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 1, 5)
    syn = torch.tensor([False, True, True, True, False])  # differences 1, 4, 9 at synthesized positions
    assert losses.cross_view_distillation(axial, other, 1.0, syn).item() == pytest.approx((1 + 4 + 9) / 3)
    assert losses.cross_view_distillation(axial, other, 0.34, syn).item() == pytest.approx((1 + 4) / 2)
    a = torch.zeros(1, 1, 1, 1, 5, requires_grad=True)
    o = other.clone().requires_grad_(True)
    losses.cross_view_distillation(a, o, 1.0, syn).backward()
    assert a.grad.abs().sum() > 0 and o.grad.abs().sum() > 0, "mutual: gradients reach both views"
    a.grad = None
    losses.cross_view_distillation(a, o, 1.0, syn, detach_axial=True).backward()
    assert a.grad is None or a.grad.abs().sum() == 0


def test_memory_losses_hand_computed():
    items = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    feats = torch.tensor([[1.0, 0.0], [0.0, 3.0]]).t().reshape(1, 2, 1, 2)  # two positions: (1,0) and (0,3)
    p = torch.softmax(feats.permute(0, 2, 3, 1) @ items.t(), dim=-1)
    # position (1,0): p favours item 1 (dot 3) then item 0 (dot 0): d_pos = 2, d_neg = 1
    # position (0,3): p favours item 2 (dot 12) then item 0: d_pos = 1, d_neg = 3
    com, sep = losses.memory_losses(feats, p, items, margin=1.0, reduction="sum")
    assert com.item() == pytest.approx(2 + 1)
    assert sep.item() == pytest.approx(max(2 - 1 + 1, 0) + max(1 - 3 + 1, 0))
    com_mean, sep_mean = losses.memory_losses(feats, p, items, margin=1.0, reduction="mean")
    assert com_mean.item() == pytest.approx(1.5) and sep_mean.item() == pytest.approx(1.0)


def test_level_two_has_r_squared_slice_density():
    r = 3
    net = scripts.networks.ICMDNet(
        r, axial={"width": 16, "groups": 1, "blocks": 1}, planar={"width": 8, "groups": 1, "blocks": 1}
    )
    iteration = scripts.training.ICMDIteration(r, cmd_planes=4)
    seen = []
    original = net.coronal_view

    def spy(volume):
        out = original(volume)
        seen.append((volume.shape[-1], out.shape[-1]))
        return out

    net.coronal_view = spy
    volume = torch.randn(1, 1, 16, 16, 5)
    iteration.distillation(net, volume, stage=2, gamma=0.25)
    (z1_in, _), (z2_in, z2_out) = seen
    assert z1_in == 5 and z2_in == (5 - 1) * r + 1  # level 2 upsamples level 1's own output
    assert (z2_out - r + 1) == ((5 - 1) * r) * r + 1  # r^2 x the input's slice density


@pytest.mark.parametrize("profile", ["removal", "average"])
def test_slice_profiles_keep_slice_centres(profile):
    z = torch.arange(13, dtype=torch.float32).view(1, 1, 1, 1, 13)
    thick = scripts.degradation.degrade_last(z, 4, profile)
    # a linear ramp: removal and a centred box both give the ramp at 0, 4, 8, 12 (ends replicate)
    expected = (
        torch.tensor([0.0, 4.0, 8.0, 12.0]) if profile == "removal" else torch.tensor([0.5, 4.0, 8.0, 11.5])
    )
    assert torch.allclose(thick.flatten(), expected)
