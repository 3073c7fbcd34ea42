"""Network shapes for r = 2, 3, 4, known-slice copying, and the options that change structure.

Views, fusion and chunking are compared on perturbed (trained-like) weights: a freshly built
network's view networks start as linear interpolation (their last layers are zero), so on fresh
weights every view is the same tensor and a comparison of them could not fail."""

from __future__ import annotations

import pytest
import torch
from conftest import perturbed

from icmd_auto.template import scripts

net_mod = scripts.networks
TINY_A = {"width": 16, "groups": 1, "blocks": 1}
TINY_P = {"width": 8, "groups": 1, "blocks": 1}
DIFFERENT = 1e-2  # standardised units: views closer than this would make the comparisons below vacuous


def trained_like(factor: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return perturbed(net_mod.ICMDNet(factor, axial=TINY_A, planar=TINY_P, **kwargs)).eval()


def assert_views_differ(views: dict) -> None:
    names = sorted(views)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (views[a] - views[b]).abs().max() > DIFFERENT, f"views {a} and {b} are the same tensor"


@pytest.mark.parametrize("factor", [2, 3, 4])
@pytest.mark.parametrize("in_slices", [2, 4])
def test_axial_network_predicts_r_minus_1_slices(factor, in_slices):
    g_a = net_mod.AxialSliceInterpolator(factor, in_slices, **TINY_A, mem_items=10)
    out, aux = g_a(torch.randn(3, in_slices, 37, 29))  # sizes need not be multiples of 8
    assert out.shape == (3, factor - 1, 37, 29)
    assert aux["e3"].shape == (3, 16, 5, 4) and aux["p"].shape == (3, 5, 4, 10)
    assert torch.allclose(aux["p"].sum(-1), torch.ones(3, 5, 4))


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_han_upsamples_along_z_only(factor):
    g_c = net_mod.HANInterpolator(factor, **TINY_P)
    x = torch.randn(5, 1, 24, 7)
    out = g_c(x)
    assert out.shape == (5, 1, 24, 7 * factor)
    # freshly built, the residual branch is zero: linear interpolation, known samples exact
    assert torch.allclose(out[..., ::factor], x, atol=1e-6)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_icmd_net_views_and_fusion(factor):
    net = trained_like(factor, share_cs=False)  # G_s its own network: three different views
    volume = torch.randn(2, 1, 20, 16, 6)
    with torch.no_grad():
        out = net(volume)
        views = {v: net.view(v, volume) for v in ("a", "c", "s")}
    syn = torch.ones(6 * factor, dtype=torch.bool)
    syn[::factor] = False
    assert_views_differ({k: v[..., syn] for k, v in views.items()})
    assert out.shape == (2, 1, 20, 16, 6 * factor)
    assert torch.equal(out[..., ::factor], volume), "known slices are copied unchanged"
    for v in views.values():
        assert v.shape == out.shape
    fused = (views["a"] + views["c"] + views["s"]) / 3
    assert torch.allclose(out[..., syn], fused[..., syn], atol=1e-6)
    assert (out.shape[-1] - factor + 1) == (volume.shape[-1] - 1) * factor + 1  # the covered range


def test_plane_chunking_gives_the_same_output():
    net = trained_like(3)
    chunked = net_mod.ICMDNet(3, axial=TINY_A, planar=TINY_P, plane_chunk=5).eval()
    chunked.load_state_dict(net.state_dict())
    linear = net_mod.ICMDNet(3, axial=TINY_A, planar=TINY_P).eval()  # fresh: linear interpolation
    volume = torch.randn(1, 1, 17, 13, 5)
    with torch.no_grad():
        whole = net(volume)
        assert (whole - linear(volume)).abs().max() > DIFFERENT, "the weights synthesise"
        assert torch.allclose(whole, chunked(volume), atol=1e-5)


def test_share_cs_and_memory_switch_change_the_state_dict():
    shared = net_mod.ICMDNet(2, axial=TINY_A, planar=TINY_P, share_cs=True)
    separate = net_mod.ICMDNet(2, axial=TINY_A, planar=TINY_P, share_cs=False)
    assert not any(k.startswith("sagittal.") for k in shared.state_dict())
    assert any(k.startswith("sagittal.") for k in separate.state_dict())
    assert "axial.memory.items" in shared.state_dict()
    no_memory = net_mod.ICMDNet(2, axial=TINY_A, planar=TINY_P, use_memory=False)
    assert no_memory.axial.memory is None and "axial.memory.items" not in no_memory.state_dict()
    assert shared.state_dict()["axial.memory.items"].shape == (10, 16)


def test_fusion_needs_its_views():
    with pytest.raises(ValueError, match="needs views"):
        net_mod.ICMDNet(2, views=("c", "s"), fusion="mean3", planar=TINY_P)
    net = net_mod.ICMDNet(2, views=("c", "s"), fusion="mean_cs", planar=TINY_P)
    assert net.axial is None


@pytest.mark.parametrize("fusion", ["a", "c", "s", "mean_cs"])
def test_single_view_fusions(fusion):
    net = trained_like(3, fusion=fusion, share_cs=False)
    volume = torch.randn(1, 1, 16, 16, 4)
    with torch.no_grad():
        out = net(volume)
        used = net_mod.FUSIONS[fusion]
        views = {v: net.view(v, volume) for v in ("a", "c", "s")}
        expected = sum(views[v] for v in used) / len(used)
    syn = torch.ones(12, dtype=torch.bool)
    syn[::3] = False
    assert_views_differ({k: v[..., syn] for k, v in views.items()})
    assert torch.allclose(out[..., syn], expected[..., syn], atol=1e-6)


def test_intensities_beyond_the_window_pass_through_the_linear_base():
    """Bone brighter than the window's top keeps its value: only the feature branches are clamped.

    The feature branches see 5 and 1 both clamped to the window's top, so they add the same to
    both outputs; what differs is the linear base alone, by 4."""
    net = trained_like(2, input_window=(-1.0, 1.0))
    bright = torch.full((1, 1, 16, 16, 4), 5.0)  # 5 std above the mean, far beyond the window
    with torch.no_grad():
        out, at_top = net(bright), net(torch.full_like(bright, 1.0))
    assert (at_top - 1.0).abs().max() > DIFFERENT, "the feature branches add something"
    assert torch.allclose(out - at_top, torch.full_like(out, 4.0), atol=1e-5)


def test_a_prior_starts_the_view_networks_it_holds_and_no_others():
    """A warm start: an in-plane prior (G_c only) loads into the ICMD recipe's network; G_a keeps
    its initialisation, a separate G_s starts as the prior's G_c; a prior that does not fit is refused."""
    prior = trained_like(3, views=("c", "s"), fusion="mean_cs").state_dict()
    torch.manual_seed(1)
    net = net_mod.ICMDNet(3, axial=TINY_A, planar=TINY_P, share_cs=False)
    axial_before = {k: v.clone() for k, v in net.axial.state_dict().items()}
    assert net.load_prior(prior) == ["axial"]
    for name in ("coronal", "sagittal"):
        loaded = getattr(net, name).state_dict()
        assert all(torch.equal(loaded[k], prior[f"coronal.{k}"]) for k in loaded), name
    assert all(torch.equal(net.axial.state_dict()[k], v) for k, v in axial_before.items())
    with pytest.raises(ValueError, match="1 weights it lacks"):
        net.load_prior({**prior, "extra.weight": torch.zeros(1)})
    partial = {k: v for i, (k, v) in enumerate(prior.items()) if i}  # one tensor of G_c missing
    with pytest.raises(ValueError, match="the prior holds coronal, sagittal only in part"):
        net.load_prior(partial)
