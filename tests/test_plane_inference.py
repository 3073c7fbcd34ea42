"""Plane-wise inference, chunking independence, and the shipped prior (zero-shot, warm start)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import PHANTOM_SHAPE, PHANTOM_SPACING, perturbed, run_cli, write_dataset

from icmd_auto import api, planner, runner
from icmd_auto.errors import PlanningError
from icmd_auto.prior import available
from icmd_auto.synthetic import ct_phantom, save_nifti
from icmd_auto.template import scripts

TINY_A = {"width": 16, "groups": 1, "blocks": 1}
TINY_P = {"width": 8, "groups": 2, "blocks": 1}


def _random_net(views=("a", "c", "s"), fusion="mean3", factor=3) -> torch.nn.Module:
    torch.manual_seed(0)
    net = scripts.networks.ICMDNet(factor, views=views, fusion=fusion, axial=TINY_A, planar=TINY_P).eval()
    return perturbed(net)  # trained-like weights: the residual branches are not zero


@pytest.mark.parametrize("views,fusion", [(("c", "s"), "mean_cs"), (("a", "c", "s"), "mean3")])
def test_plane_inferer_gives_the_networks_synthesis(views, fusion):
    net = _random_net(views, fusion)
    volume = torch.randn(1, 1, 20, 17, 6)
    with torch.no_grad():
        whole = net(volume)  # every view on all its planes at once
    chunked = scripts.inferers.PlaneInferer(plane_chunk=4)(volume, net)
    assert chunked.shape == (1, 1, 20, 17, 18)
    assert torch.allclose(chunked, whole, atol=1e-5)
    assert torch.equal(chunked[..., ::3], volume), "known slices are copied"


def test_a_planes_output_does_not_depend_on_which_planes_share_its_call():
    """Flipping the volume along y regroups the coronal planes into other calls (and another padded
    last call); each plane's synthesis must come out the same, only flipped (up to float rounding:
    a plane's place in a call shifts its memory alignment, and with it the order of vectorised sums)."""
    net = _random_net(("c",), "c")
    volume = torch.randn(1, 1, 21, 13, 5)
    inferer = scripts.inferers.PlaneInferer(plane_chunk=3)
    out = inferer(volume, net)
    flipped = inferer(volume.flip(3), net)
    assert torch.allclose(flipped.flip(3), out, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("plane_phantom")
    image = root / "phantom.nii.gz"
    save_nifti(ct_phantom(PHANTOM_SHAPE, PHANTOM_SPACING), PHANTOM_SPACING, str(image))
    return image


# large enough in-plane for one G_a slice pair to weigh more than a training patch: a budget exists
# that holds the tiny preset's training but only one plane per prediction call
CHUNKED_SHAPE = (192, 192, 8)


def test_same_voxels_under_two_memory_budgets(phantom_work, tmp_path, monkeypatch):
    """Two budgets plan different planes per call (1 and 2); with perturbed (trained-like) weights in
    both bundles, `predict` gives the same voxels: exactly in float32 up to float rounding, and in
    the stored int16 except where that rounding straddles a half HU."""
    # the CPU's bf16 probe may choose differently from one plan to the next: one precision for both
    monkeypatch.setattr(planner, "decide_inference_precision", lambda cuda: ("", "float32 (this test)"))
    image = tmp_path / "phantom.nii.gz"
    save_nifti(ct_phantom(CHUNKED_SHAPE, PHANTOM_SPACING), PHANTOM_SPACING, str(image))
    dataset = write_dataset(tmp_path / "dataset.json", [image])
    preset = planner.PRESETS["tiny"]
    fixed = planner.inference_memory_bytes(list(CHUNKED_SHAPE), 3, 0, preset.planar, preset.axial)
    per_plane = planner.inference_memory_bytes(list(CHUNKED_SHAPE), 3, 1, preset.planar, preset.axial) - fixed
    weights = perturbed(torch.load(phantom_work / "bundle" / "models" / "model.pt", weights_only=True))
    chunks, outputs = [], {}
    for memory_gb in ((fixed + 1.9 * per_plane) / 2**30, 16):
        work = tmp_path / f"work_{memory_gb:g}"
        plans = api.plan(dataset, work, preset="tiny", memory_gb=memory_gb, factor=3, recipe="icmd", epochs=1)
        chunks.append(plans["plane_inference"]["value"]["plane_chunk"])
        (work / "bundle" / "models").mkdir(exist_ok=True)
        torch.save(weights, work / "bundle" / "models" / "model.pt")
        for dtype in ("float32", None):
            out = tmp_path / f"thin_{memory_gb:g}_{dtype}.nii.gz"
            api.predict(work, image, out, quiet=True, **({"output_dtype": dtype} if dtype else {}))
            outputs[memory_gb, dtype] = np.asanyarray(nib.load(str(out)).dataobj).astype(np.float64)
    assert chunks == [1, planner.PLANE_CHUNK], chunks
    (small, large) = sorted({m for m, _ in outputs})
    precise, stored = outputs[small, "float32"], outputs[small, None]
    thick = np.asanyarray(nib.load(str(image)).dataobj).astype(np.float64)
    z = np.arange((CHUNKED_SHAPE[2] - 1) * 3 + 1) / 3
    linear = thick[..., np.floor(z).astype(int)] * (1 - z % 1) + thick[..., np.ceil(z).astype(int)] * (z % 1)
    assert np.abs(precise - linear).mean() > 5, "the weights synthesise, not interpolate linearly (HU)"
    assert np.abs(precise - outputs[large, "float32"]).max() < 1e-3, (
        "float32 HU: the same up to float rounding"
    )
    differ = stored != outputs[large, None]
    half = np.abs(precise[differ] % 1 - 0.5)
    assert differ.sum() <= 1e-4 * differ.size and (half < 1e-3).all(), (differ.sum(), half.max(initial=0))


def test_shipped_priors_cover_every_factor():
    priors = available()
    assert sorted(priors) == [2, 3, 4, 5, 6]
    for factor, prior in priors.items():
        card = prior.card
        assert card["factor"] == factor and card["recipe"] == "inplane"
        # made by `icmd_auto pretrain` (its cards list the licences), or by the earlier benchmarks script
        command = card["command"]
        assert command.startswith(("icmd_auto pretrain", "python benchmarks/pretrain.py")), command
        assert card["licences"] and set(card["licences"]) <= {"CC BY 3.0", "CC BY 4.0"}, card["licences"]
        assert prior.weights.stat().st_size < 2_000_000, "a few MB at most in all"
        best = card["validation"]["best"]
        assert best["psnr"] > best["linear"], "the prior beats linear interpolation on its held-out slices"
        for name, entry in card["data"].items():  # every volume names its licence and whom to credit
            assert entry["licence"] and entry["attribution"], name
        assert "LIDC-IDRI-0314" not in json.dumps(card), "kept for outside evaluation"


def test_zero_shot_predict_needs_no_work_folder(phantom, tmp_path):
    out = tmp_path / "thin.nii.gz"
    result = run_cli("predict", "--input", str(phantom), "--output", str(out))
    assert result.returncode == 0, result.stderr
    thick, thin = nib.load(str(phantom)), nib.load(str(out))
    assert thin.shape == (*PHANTOM_SHAPE[:2], (PHANTOM_SHAPE[2] - 1) * 3 + 1), (
        "x3 from the 3 mm / 1 mm spacing"
    )
    expected = thick.affine.copy()
    expected[:3, 2] /= 3
    assert np.array_equal(thin.affine, expected)
    assert np.array_equal(np.asanyarray(thin.dataobj)[:, :, ::3], np.asanyarray(thick.dataobj))
    assert "zero-shot" in result.stderr
    again = run_cli(
        "predict", "--input", str(phantom), "--output", str(tmp_path / "x2.nii.gz"), "--factor", "2"
    )
    assert again.returncode == 0, again.stderr
    assert nib.load(str(tmp_path / "x2.nii.gz")).shape[2] == (PHANTOM_SHAPE[2] - 1) * 2 + 1


def _initialised_network(bundle):
    """train.json's network after its ``initialize`` step that loads ``init_weights`` (the warm start)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser.update({"bundle_root": str(bundle), **runner.private_targets(bundle, ["train.json"])})
    loading = [i for i, e in enumerate(parser["initialize"]) if "init_weights" in e]
    assert len(loading) == 1
    parser.get_parsed_content(f"initialize#{loading[0]}")
    return parser.get_parsed_content("network")


def test_plan_says_which_init_and_why(phantom, tmp_path):
    dataset = write_dataset(tmp_path / "dataset.json", [phantom])
    default = api.plan(dataset, tmp_path / "default", factor=3, epochs=1)
    assert default["init"]["value"] == {"mode": "prior", "weights": str(available()[3].weights)}
    assert "the default" in default["init"]["reason"]
    assert planner.DEFAULT_INIT_EVIDENCE in default["init"]["reason"]
    for i, (options, why) in enumerate(
        (
            ({"recipe": "icmd"}, "measured for the prior's recipe 'inplane', not 'icmd'"),
            ({"preset": "tiny"}, "--preset tiny differs from the prior's preset"),
        )
    ):
        other = api.plan(dataset, tmp_path / f"other{i}", **{"factor": 3, "epochs": 1, **options})
        assert other["init"]["value"]["mode"] == "scratch" and why in other["init"]["reason"], options
    warm = api.plan(dataset, tmp_path / "warm", factor=3, epochs=1, init="prior")
    assert warm["init"]["value"]["mode"] == "prior" and "given (--init prior)" in warm["init"]["reason"]
    assert warm["intensity"]["value"] == available()[3].intensity, "the prior's standardisation"
    train = json.loads((tmp_path / "warm" / "bundle" / "configs" / "train.json").read_text())
    assert train["init_weights"].endswith("/models/prior.pt'")
    assert (tmp_path / "warm" / "bundle" / "models" / "prior.pt").is_file()
    scratch = api.plan(dataset, tmp_path / "scratch", factor=3, epochs=1, init="scratch")
    assert scratch["init"]["value"]["mode"] == "scratch" and "given" in scratch["init"]["reason"]
    # the fine-tuning rate: the preset's at x3, a quarter of it at x4 (measured), scratch the preset's
    preset_lr = planner.PRESETS[warm["preset"]["value"]].learning_rate
    assert (
        warm["training"]["value"]["learning_rate"]
        == scratch["training"]["value"]["learning_rate"]
        == preset_lr
    )
    x4 = api.plan(dataset, tmp_path / "x4", factor=4, epochs=1)
    assert (
        x4["init"]["value"]["mode"] == "prior" and "0.25 x the preset's learning rate" in x4["init"]["reason"]
    )
    assert x4["training"]["value"]["learning_rate"] == pytest.approx(0.25 * preset_lr)
    with pytest.raises(PlanningError, match="--init prior: --preset tiny differs from the prior's preset"):
        api.plan(dataset, tmp_path / "misfit", factor=3, epochs=1, recipe="icmd", preset="tiny", init="prior")
    with pytest.raises(PlanningError, match="--init prior: recipe 'icmd': the prior does not fit"):
        api.plan(
            dataset,
            tmp_path / "misfit2",
            factor=3,
            epochs=1,
            recipe="icmd",
            method={"views": ["a"], "fusion": "a"},
            init="prior",
        )
    paper_warm = api.plan(dataset, tmp_path / "icmd_warm", factor=3, epochs=1, recipe="icmd", init="prior")
    assert paper_warm["init"]["value"]["mode"] == "prior"
    assert "G_a from scratch" in paper_warm["init"]["reason"]
    net = _initialised_network(tmp_path / "icmd_warm" / "bundle")  # what train.json's initialize loads
    prior = torch.load(available()[3].weights, map_location="cpu", weights_only=True)
    assert net.axial is not None and net.sagittal is None
    assert all(torch.equal(v, prior[f"coronal.{k}"]) for k, v in net.coronal.state_dict().items())
    paper = api.plan(dataset, tmp_path / "icmd", factor=3, epochs=1, recipe="icmd", preset="tiny")
    assert paper["init"]["value"]["mode"] == "scratch"
    assert (
        json.loads((tmp_path / "icmd" / "bundle" / "configs" / "train.json").read_text())["init_weights"]
        is None
    )


def test_a_zero_shot_plan_skips_the_training_probes(phantom, tmp_path, monkeypatch):
    """zero-shot predicts with the prior and never trains: no validation FLOPs, no training-precision probe."""
    from icmd_auto import planner

    def never(*args, **kwargs):
        raise AssertionError("a training-only probe ran for a zero-shot plan")

    monkeypatch.setattr(planner, "decide_validation", never)
    monkeypatch.setattr(planner, "decide_amp", never)
    (tmp_path / "zero_shot").mkdir()
    work = api.zero_shot_work(phantom, tmp_path / "zero_shot", factor=3, quiet=True)
    plans = json.loads((work / "plans.json").read_text())
    assert "inference only (zero-shot)" in plans["validation"]["reason"]
    assert plans["init"]["value"]["mode"] == "prior" and (work / "bundle" / "models" / "model.pt").is_file()


def test_the_tuner_measures_planes_per_call_and_keeps_the_output_bit_for_bit(caplog):
    """With ``tune`` the inferer times 2 and 4 planes per call (channels-last: the candidates whose
    outputs are bit-identical), keeps the trials' outputs and runs the rest with the fastest: the
    voxels are exactly those of a fixed 2 planes per call (a timing never changes a file), and the
    choice is kept for the process."""
    # the shipped preset (32 channels; bit-identity across call sizes is oneDNN's, measured for it:
    # the 8-channel test network differs by 2e-7 between 2 and 4 planes per call)
    torch.manual_seed(0)
    net = perturbed(planner.build_network(3, planner.PRESETS["small"], planner.RECIPES["inplane"]).eval())
    volume = torch.randn(1, 1, 96, 90, 6)  # 90 and 96 planes: at least TUNE_MIN_RATIO x the trials' 12
    inferers = scripts.inferers
    fixed = inferers.PlaneInferer(plane_chunk=2, tune=False)(volume, net)
    inferers._CHOICES.clear()
    with caplog.at_level("INFO", logger=inferers.__name__):
        tuned = inferers.PlaneInferer(plane_chunk=4, tune=True)(volume, net)
    assert torch.equal(tuned, fixed), "the trials' planes and the rest: the same voxels as a fixed chunk"
    choices = inferers.plane_call_choices()
    assert len(choices) == 2, "one choice per plane shape (coronal 96 x 6, sagittal 90 x 6)"
    for size, channels_last, seconds in choices.values():
        assert set(seconds) == {(2, True), (4, True)}, "2 and 4 planes per call timed, channels-last"
        assert (size, channels_last) == min(seconds, key=seconds.get), "the fastest is kept"
    assert sum("plane inference:" in r.message for r in caplog.records) == 2
    again = inferers.PlaneInferer(plane_chunk=4, tune=True)(volume, net)  # the kept choice: no trials
    assert inferers.plane_call_choices() == choices and torch.equal(again, fixed)
    with torch.no_grad():
        whole = net(volume)
    assert torch.allclose(tuned, whole, atol=1e-5), "the networks' synthesis"
    small = torch.randn(1, 1, 20, 17, 6)  # too few planes for trials: the given 4 per call
    inferers._CHOICES.clear()
    with torch.no_grad():
        expected = net(small)
    assert torch.allclose(inferers.PlaneInferer(plane_chunk=4, tune=True)(small, net), expected, atol=1e-5)
    assert not inferers.plane_call_choices()
