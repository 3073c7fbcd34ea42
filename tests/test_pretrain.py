"""`icmd_auto pretrain` on small made volumes: the batched crops and their resampler (the one
per-scan training uses), the held-out slab no crop reads, thin supervision along z, a run killed
and continued (``--resume``) against an uninterrupted one, and bad volumes named."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from icmd_auto import cli, prior
from icmd_auto import pretrain as pt
from icmd_auto.errors import ICMDError
from icmd_auto.planner import PRESETS, RECIPES, build_network
from icmd_auto.synthetic import ct_phantom, save_nifti
from icmd_auto.template import scripts

UNIT = {"mean": 0.0, "std": 1.0}  # keeps the made values as they are
CPU = torch.device("cpu")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct"


def made_volumes(*shapes: tuple[int, int, int], spacing=(1.0, 1.0, 3.0)) -> dict:
    rng = np.random.default_rng(0)
    return {
        f"v{k}": pt.Volume(rng.normal(size=shape).astype(np.float32), spacing, f"v{k}")
        for k, shape in enumerate(shapes)
    }


def training_slices(volumes: dict, factor: int) -> list[tuple[str, int]]:
    """(volume, z) of each row of the bank's axial table, in order: the central slab is held out."""
    rows = []
    for name, v in volumes.items():
        start, stop = pt.validation_slab(v.array.shape[2], factor)
        rows += [(name, z) for z in range(v.array.shape[2]) if not start <= z < stop]
    return rows


def flipped(plane: torch.Tensor, code: int) -> torch.Tensor:
    if code & 4:
        plane = plane.t()
    if code & 1:
        plane = plane.flip(0)
    if code & 2:
        plane = plane.flip(1)
    return plane


def test_batched_crop_equals_plain_slicing():
    volumes = made_volumes((40, 36, 10), (30, 33, 7))
    bank = pt.PlaneBank(volumes, UNIT, 2, CPU, thin=False, size=12)
    where = training_slices(volumes, 2)
    assert len(bank.axial) == len(where)
    size = 12
    n = len(where)
    rows = torch.tensor([0, 3, n - 1, 4, n - 2, 5, 2, 1])
    corners = torch.tensor([[0, 0], [28, 24], [18, 21], [10, 3], [3, 1], [0, 9], [11, 2], [6, 6]]).float()

    def source(k: int) -> torch.Tensor:
        name, z = where[int(rows[k])]
        return torch.from_numpy(volumes[name].array[:, :, z])

    # scale 1, each of the 8 flips/transposes: the pixels themselves
    crops = bank.crop(bank.axial, rows, corners, torch.ones(8), torch.arange(8), size)
    assert crops.shape == (8, 1, size, size)
    for k in range(8):
        a, b = (int(c) for c in corners[k])
        assert torch.equal(crops[k, 0], flipped(source(k)[a : a + size, b : b + size], k)), f"crop {k}"

    # scale 1/2: area resampling, the mean of 2 x 2 pixels
    half = torch.tensor([[0, 0], [16, 12], [6, 9], [4, 2], [2, 0], [0, 8], [5, 7], [3, 5]]).float()
    crops = bank.crop(bank.axial, rows, half, torch.full((8,), 0.5), torch.zeros(8, dtype=torch.long), size)
    for k in range(8):
        a, b = (int(c) for c in half[k])
        region = source(k)[a : a + 2 * size, b : b + 2 * size]
        torch.testing.assert_close(
            crops[k, 0], F.interpolate(region[None, None], size=(size, size), mode="area")[0, 0]
        )


@pytest.mark.parametrize("scale", [0.5, 0.7, 1.3, 2.0])
def test_pretraining_crops_are_made_as_per_scan_training_makes_them(scale):
    # one resampler: a crop of a whole slice at the per-scan grid's corner equals the slice that
    # per-scan training (degradation.inplane_planes) resamples, at any scale, not only 0.5, 1 and 2
    volumes = made_volumes((40, 40, 8))
    bank = pt.PlaneBank(volumes, UNIT, 2, CPU, thin=False, size=8)
    plane = torch.from_numpy(volumes["v0"].array[:, :, 0])
    per_scan = scripts.degradation.inplane_planes(plane[None, None, :, :, None], scale)[0, 0]
    size = per_scan.shape[0]
    step = torch.tensor([1 / scale], dtype=torch.float64)
    extent = (size - 1) * step + 2 * scripts.degradation.area_half_width(step)
    corner = float((40 - 1 - extent) / 2)  # enlarging, a fraction of a pixel before the slice
    crop = bank.crop(
        bank.axial,
        torch.tensor([0]),
        torch.tensor([[corner, corner]]),
        torch.tensor([scale]),
        torch.tensor([0]),
        size,
    )[0, 0]
    torch.testing.assert_close(crop, per_scan, rtol=0, atol=1e-4)


def test_drawn_crops_stay_inside_one_training_slice():
    # every slice holds one value, 100 * volume + z: a crop that crossed a plane's edge, or read a
    # held-out slice, would show another value
    volumes = made_volumes((40, 30, 12), (64, 70, 9))
    for k, v in enumerate(volumes.values()):
        v.array[:] = 100 * k + np.arange(v.array.shape[2], dtype=np.float32)
    bank = pt.PlaneBank(volumes, UNIT, 2, CPU, thin=False, size=24)
    allowed = {
        100 * k + z for k, name in enumerate(volumes) for n, z in training_slices(volumes, 2) if n == name
    }
    generator = torch.Generator().manual_seed(0)
    scales = (math.log(0.5), math.log(1.25))
    crops = bank.draw(bank.axial, 256, 24, scales, generator)[:, 0]
    values = crops.flatten(1)
    torch.testing.assert_close(values, values[:, :1].expand_as(values), rtol=0, atol=1e-4)
    seen = {round(float(v)) for v in values[:, 0]}
    assert seen <= allowed and len(seen) > len(allowed) // 2
    again = bank.draw(bank.axial, 256, 24, scales, torch.Generator().manual_seed(0))[:, 0]
    assert torch.equal(crops, again), "the same generator state draws the same batch"


def test_thin_supervision_crops_never_read_the_validation_slab():
    # a thin volume (1 mm slices) gives z-axis planes; each holds z as its value, so a crop's values
    # are the slices it read: none may lie in the held-out slab (the leak of the earlier --zpairs)
    volumes = made_volumes((30, 28, 60), spacing=(0.8, 0.8, 1.0))
    volumes |= {"thick": pt.Volume(np.zeros((30, 28, 60), np.float32), (0.8, 0.8, 3.0), "thick")}
    volumes["v0"].array[:] = np.arange(60, dtype=np.float32)
    bank = pt.PlaneBank(volumes, UNIT, 4, CPU, thin=True, size=16)
    assert bank.thin_volumes == ["v0"], "only the volume with thin slices gives z pairs"
    start, stop = bank.slabs["v0"]
    crops = bank.draw(bank.zplanes, 512, 16, (0.0, 0.0), torch.Generator().manual_seed(1), flips=False)
    read = set(np.unique(crops.numpy().round()).astype(int))
    assert not read & set(range(start, stop)), (
        f"read held-out slices {sorted(read & set(range(start, stop)))}"
    )
    assert read & set(range(start)) and read & set(range(stop, 60)), "both parts are drawn"
    # z last: along the crop's last axis the slice index grows by one per pixel
    assert torch.equal(crops[:, 0, :, 1:] - crops[:, 0, :, :-1], torch.ones(512, 16, 15))
    kinds = [kind for _, kind, _ in bank.validation_items()]
    assert kinds == ["inplane", "z", "inplane"]
    # in-plane crops larger than the slices on either side of the slab (25 and 26): the z crops
    # shrink to the longest part, a multiple of r (the 112-slice 1.5 mm chest at x4: 48, not 96)
    wide = pt.PlaneBank(volumes, UNIT, 4, CPU, thin=True, size=40)
    assert (wide.zsize, wide.thin_volumes) == (24, ["v0"])
    crops = wide.draw(
        wide.zplanes, 256, wide.zsize, (0.0, 0.0), torch.Generator().manual_seed(2), flips=False
    )
    read = set(np.unique(crops.numpy().round()).astype(int))
    assert crops.shape == (256, 1, 24, 24) and not read & set(range(start, stop))
    assert pt.PlaneBank(volumes, UNIT, 8, CPU, thin=True, size=40).zsize == 0, "under 4 thick slices: none"


def write_data(folder: Path, shapes=((48, 44, 14), (40, 40, 12)), spacing=(1.0, 1.0, 2.0)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for seed, shape in enumerate(shapes):
        save_nifti(ct_phantom(shape, spacing, seed=seed), spacing, str(folder / f"made_{seed}.nii.gz"))
    record = {"file": "made_0.nii.gz", "name": "made_0", "licence": "CC0", "attribution": "this test"}
    (folder / "sources.json").write_text(json.dumps({"series": [record]}))  # as benchmarks/fetch_ct.py writes
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("ct"))


def run(data_dir: Path, out: Path, *extra: str) -> dict:
    argv = ["pretrain", "--data_dir", str(data_dir), "--factor", "2", "--out", str(out), "--preset", "tiny"]
    argv += ["--patch", "24", "--planes", "4", "--threads", "1", "--nobf16", *extra]
    assert cli.main(argv) == 0
    return json.loads((out / "prior_x2.json").read_text())


def test_a_killed_run_continued_trains_what_an_uninterrupted_one_trains(data_dir, tmp_path):
    card = run(data_dir, tmp_path / "leases", "--steps", "6", "--stop_after", "4")
    assert card["iterations"] == 4 and card["factor"] == 2 and card["schedule"]["total_steps"] == 6
    assert sorted(card["data"]) == ["made_0", "made_1"] and card["data"]["made_0"]["shape"] == [48, 44, 14]
    assert card["data"]["made_0"]["licence"] == "CC0" and card["data"]["made_1"]["licence"] == "not stated"
    assert card["licences"] == ["CC0", "not stated"]
    assert str(tmp_path) not in json.dumps(card), "the card names no folder of this machine"
    first_curve = card["validation"]["curve"]

    card = run(data_dir, tmp_path / "leases", "--steps", "6", "--resume")
    assert card["iterations"] == 6
    assert [(lease["first_step"], lease["steps"]) for lease in card["leases"]] == [(0, 4), (4, 2)]
    assert card["validation"]["curve"][: len(first_curve)] == first_curve

    # one run of the same 6-step cosine schedule: the same weights, best weights and curve
    straight_card = run(data_dir, tmp_path / "one_run", "--steps", "6")
    resumed = torch.load(tmp_path / "leases" / "prior_x2.ckpt", weights_only=False)
    straight = torch.load(tmp_path / "one_run" / "prior_x2.ckpt", weights_only=False)
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for name in ("prior_x2.pt",):
        a = torch.load(tmp_path / "leases" / name, weights_only=True)
        b = torch.load(tmp_path / "one_run" / name, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in b)

    def scores(c: dict) -> list[dict]:
        return [
            {k: v for k, v in p.items() if k not in ("seconds", "lease")} for p in c["validation"]["curve"]
        ]

    assert scores(card) == scores(straight_card)
    # the prior loads into the recipe's network
    net = build_network(2, PRESETS["tiny"], RECIPES["inplane"])
    net.load_state_dict(torch.load(tmp_path / "one_run" / "prior_x2.pt", weights_only=True))

    # --init_from continues a prior on a new schedule; the card keeps its history
    card = run(data_dir, tmp_path / "next", "--steps", "2", "--init_from", str(tmp_path / "one_run"))
    assert card["continued_from"]["iterations"] == 6 and card["continued_from"]["data"] == [
        "made_0",
        "made_1",
    ]
    assert card["cpu_hours"] > card["continued_from"]["cpu_hours"] > 0


def test_bad_volumes_are_named_one_line_each(tmp_path, capsys):
    folder = write_data(tmp_path / "ct", shapes=((48, 44, 14),))
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08 not really gzip")
    save_nifti(
        ct_phantom((48, 44, 3), (1.0, 1.0, 2.0), seed=3), (1.0, 1.0, 2.0), str(folder / "short.nii.gz")
    )
    argv = [
        "pretrain",
        "--data_dir",
        str(folder),
        "--factor",
        "2",
        "--out",
        str(tmp_path / "p"),
        "--steps",
        "1",
    ]
    argv += ["--preset", "tiny", "--patch", "24", "--planes", "2", "--nobf16"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "broken.nii.gz" in err and "short.nii.gz: 3 slice(s); pretraining needs at least 6" in err
    assert not (tmp_path / "p" / "prior_x2.pt").exists()
    assert cli.main(argv + ["--skip_bad"]) == 0
    card = json.loads((tmp_path / "p" / "prior_x2.json").read_text())
    assert sorted(card["data"]) == ["made_0"]


@pytest.mark.skipif(
    not (SHARED / "totalseg_dicom_series").is_dir(), reason="needs ../shared/data (a DICOM series)"
)
def test_a_folder_of_nifti_files_and_dicom_series(tmp_path):
    folder = write_data(tmp_path / "ct", shapes=((48, 44, 14),))
    shutil.copytree(SHARED / "totalseg_dicom_series", folder / "dicom_series")
    card = run(folder, tmp_path / "p", "--steps", "1")
    assert card["data"]["dicom_series"]["shape"] == [512, 512, 20]
    assert card["data"]["dicom_series"]["source"] == "dicom_series"


@pytest.fixture(scope="module")
def prior_folder(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site_prior")
    run(data_dir, out, "--steps", "3")
    return out


def test_predict_and_plan_take_a_prior_folder_that_pretrain_wrote(
    prior_folder, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("ICMD_AUTO_PRIORS", raising=False)  # --prior sets it for the process: undone after
    thick = tmp_path / "thick.nii.gz"
    save_nifti(ct_phantom((40, 36, 8), (1.0, 1.0, 2.0), seed=7), (1.0, 1.0, 2.0), str(thick))
    ours, shipped = tmp_path / "ours.nii.gz", tmp_path / "shipped.nii.gz"
    assert (
        cli.main(
            [
                "predict",
                "--input",
                str(thick),
                "--output",
                str(ours),
                "--factor",
                "2",
                "--prior",
                str(prior_folder),
            ]
        )
        == 0
    )
    monkeypatch.delenv("ICMD_AUTO_PRIORS")
    assert cli.main(["predict", "--input", str(thick), "--output", str(shipped), "--factor", "2"]) == 0
    a, b = (np.asarray(nib.load(str(p)).dataobj) for p in (ours, shipped))
    assert a.shape == b.shape == (40, 36, 15) and not np.array_equal(a, b), (
        "the site's prior, not the shipped one"
    )

    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps({"training": [thick.name], "factor": 2}))
    work = tmp_path / "work"
    argv = [
        "plan",
        "--dataset",
        str(dataset),
        "--work",
        str(work),
        "--init",
        "prior",
        "--prior",
        str(prior_folder),
    ]
    assert (
        cli.main(argv + ["--time_budget_min", "1", "--seconds_per_iteration", "0.1", "--threads", "1"]) == 0
    )
    plans = json.loads((work / "plans.json").read_text())
    assert plans["init"]["value"]["mode"] == "prior" and plans["preset"]["value"] == "tiny"
    assert (work / "bundle" / "models" / "prior.pt").read_bytes() == (
        prior_folder / "prior_x2.pt"
    ).read_bytes()

    assert (
        cli.main(
            [
                "predict",
                "--input",
                str(thick),
                "--output",
                str(tmp_path / "x.nii.gz"),
                "--prior",
                str(tmp_path),
            ]
        )
        == 1
    )
    assert "no prior (prior_xR.pt with its card prior_xR.json)" in capsys.readouterr().err


def test_a_prior_folder_serves_a_block_and_the_previous_one_comes_back(prior_folder, tmp_path, monkeypatch):
    """prior.directory_in_use (the benchmarks' leave-one-out priors): --prior for a block only."""
    monkeypatch.setenv("ICMD_AUTO_PRIORS", str(prior.PRIOR_DIR))
    with prior.directory_in_use(prior_folder) as used:
        assert prior.prior_dir() == used == prior_folder.absolute()
        assert prior.available()[2].weights == prior_folder.absolute() / "prior_x2.pt"
    assert prior.prior_dir() == prior.PRIOR_DIR
    monkeypatch.delenv("ICMD_AUTO_PRIORS")
    with pytest.raises(ICMDError, match="no prior"), prior.directory_in_use(tmp_path):
        pass
    with pytest.raises(RuntimeError), prior.directory_in_use(prior_folder):
        raise RuntimeError("a failing block")
    assert "ICMD_AUTO_PRIORS" not in os.environ


def test_reparameterised_training_keeps_the_function_and_folds_into_the_plain_network():
    """expand() changes no output; after training-like changes, fold() gives the plain network's
    state dict (strict load) with the expanded network's outputs; each branch reaches the kernel."""
    from conftest import perturbed

    reparam = scripts.networks.reparam
    net = perturbed(build_network(4, PRESETS["tiny"], RECIPES["inplane"]).coronal, seed=1)
    planes = torch.randn(3, 1, 20, 6, generator=torch.Generator().manual_seed(0))
    before = net(planes)
    expanded = pt.copy.deepcopy(net)
    assert reparam.expand(expanded) == sum(
        isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in net.modules()
    )
    assert torch.equal(expanded(planes), before)
    perturbed(expanded, seed=2)  # every branch moves, as training moves it
    after = expanded(planes)
    assert (after - before).abs().max() > 1e-3
    plain = build_network(4, PRESETS["tiny"], RECIPES["inplane"]).coronal
    plain.load_state_dict(reparam.folded_state_dict(expanded), strict=True)
    assert torch.allclose(plain(planes), after, atol=1e-5)
    # each branch contributes to the folded kernel (a branch left out of kernel() would pass the above)
    conv = next(
        m for m in expanded.modules() if isinstance(m, reparam.RepConv2d) and m.identity_scale is not None
    )
    for name in ("k1", "expand_out", "edge_scale", "identity_scale"):
        kernel = conv.kernel().detach().clone()
        with torch.no_grad():
            getattr(conv, name).add_(0.1)
        assert not torch.allclose(conv.kernel(), kernel), name


def test_a_reparameterised_prior_is_written_folded_and_resumes_only_as_such(data_dir, tmp_path):
    card = run(data_dir, tmp_path / "rep", "--steps", "3", "--stop_after", "2", "--reparam")
    assert card["reparam"] and card["architecture"]["planar"] == PRESETS["tiny"].planar
    net = build_network(2, PRESETS["tiny"], RECIPES["inplane"])
    net.load_state_dict(torch.load(tmp_path / "rep" / "prior_x2.pt", weights_only=True), strict=True)
    argv = ["pretrain", "--data_dir", str(data_dir), "--factor", "2", "--out", str(tmp_path / "rep")]
    argv += ["--preset", "tiny", "--patch", "24", "--planes", "4", "--threads", "1", "--nobf16", "--resume"]
    assert cli.main(argv + ["--steps", "3"]) == 1, "a reparameterised run does not continue as a plain one"
    assert run(data_dir, tmp_path / "rep", "--steps", "3", "--resume", "--reparam")["iterations"] == 3


def test_keep_last_writes_the_final_weights_and_a_finished_run_can_switch_to_them(data_dir, tmp_path):
    card = run(data_dir, tmp_path / "p", "--steps", "3", "--lr", "0.5", "--keep", "best")  # spoiling rate
    assert card["validation"]["kept"] == {"weights": "best", "iteration": 0}
    final = torch.load(tmp_path / "p" / "prior_x2.ckpt", weights_only=False)["model"]
    best = torch.load(tmp_path / "p" / "prior_x2.pt", weights_only=True)
    card = run(data_dir, tmp_path / "p", "--steps", "3", "--resume", "--keep", "last")
    assert card["validation"]["kept"] == {"weights": "last", "iteration": 3}
    kept = torch.load(tmp_path / "p" / "prior_x2.pt", weights_only=True)
    assert all(torch.equal(kept[k], final[k]) for k in final)
    assert any(not torch.equal(best[k], final[k]) for k in final)

    card = run(data_dir, tmp_path / "q", "--steps", "3")  # the default: last
    assert card["validation"]["kept"] == {"weights": "last", "iteration": 3}
    kept = torch.load(tmp_path / "q" / "prior_x2.pt", weights_only=True)
    final = torch.load(tmp_path / "q" / "prior_x2.ckpt", weights_only=False)["model"]
    assert all(torch.equal(kept[k], final[k]) for k in final)
    assert (
        cli.main(
            [
                "pretrain",
                "--data_dir",
                str(data_dir),
                "--factor",
                "2",
                "--out",
                str(tmp_path / "r"),
                "--keep",
                "worst",
            ]
        )
        == 1
    )


def test_a_left_out_volume_scores_the_run_along_its_real_z_axis(tmp_path, capsys):
    folder = write_data(tmp_path / "ct", shapes=((48, 44, 14), (40, 40, 12), (44, 40, 17)))
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08 not really gzip")
    card = run(folder, tmp_path / "p", "--steps", "2", "--leave_out", "made_2,broken")
    assert sorted(card["data"]) == ["made_0", "made_1"] and card["left_out"] == ["made_2", "broken"]
    assert "--leave_out broken: not scored" in capsys.readouterr().err  # a bad one only scores nothing
    for point in card["validation"]["curve"]:
        assert point["held_out_psnr"] > 10 and point["held_out_linear"] > 10

    # what it scores: made_2's standardised coronal and sagittal planes through its centre crop, every
    # slice that removal by r keeps or synthesizes (16 slices at x4: 4 thick, 13 covered)
    volume = pt.Volume(np.arange(44 * 40 * 16, dtype=np.float32).reshape(44, 40, 16), (1.0, 1.0, 1.0), "v")
    ((name, kind, planes),) = pt.left_out_items({"v": volume}, {"mean": 5.0, "std": 2.0}, 4, CPU)
    assert (name, kind) == ("v", "left_out") and planes.shape == (2 * pt.LEFT_OUT_PLANES, 1, 40, 13)
    standardised = torch.from_numpy((volume.array - 5.0) / 2.0)
    picks = np.linspace(0, 39, pt.LEFT_OUT_PLANES + 2)[1:-1].round().astype(int)
    assert torch.equal(planes[0, 0], standardised[2:42, picks[0], :13])  # coronal: the centre 40 of x
    assert torch.equal(planes[pt.LEFT_OUT_PLANES, 0], standardised[2 + picks[0], :, :13])  # sagittal


def curve(psnr: list[float], held_out: list[float] | None = None) -> list[dict]:
    points = [{"psnr": p} for p in psnr]
    for point, h in zip(points[len(points) - len(held_out or []) :], held_out or []):
        point["held_out_psnr"] = h
    return points


@pytest.mark.parametrize(
    "points, said",
    [
        (curve([40.0] * 4), "too short to judge"),
        (
            curve([40.0, 40.1, 40.2, 40.3, 40.4, 40.5]),
            "still rising: the last third of the curve gained +0.200 dB",
        ),
        (curve([40.0, 40.1, 40.2, 40.2, 40.2, 40.2]), "flat by the in-plane validation"),
        # the left-out z-axes decide where the run has them (here over the last six points only)
        (curve([40.0] * 9, [30.0, 30.1, 30.2, 30.3, 30.4, 30.5]), "still rising: on the left-out volumes"),
        (
            curve([40.0, 40.0, 40.0, 40.1, 40.2, 40.3, 40.4, 40.5, 40.6], [30.2] * 6),
            "flat for new scans: on the left-out volumes' real z-axes the last third of the curve gained +0.000 dB, "
            "while the training volumes' held-out slices gained +0.200: more (and more varied) data",
        ),
        (curve([40.0] * 6, [30.2] * 6), "the network holds what it can; a larger network is the next lever"),
    ],
)
def test_the_card_says_whether_hours_data_or_a_larger_network_is_next(points, said):
    assert said in pt.assess(points)
