"""Prior pretraining (benchmarks/pretrain.py) on small made volumes: the batched crops, a short run,
and a run continued across two leases (``--resume``)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from icmd_auto.planner import PRESETS, build_network
from icmd_auto.synthetic import ct_phantom, save_nifti

REPO = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("pretrain", REPO / "benchmarks" / "pretrain.py")
pretrain = importlib.util.module_from_spec(SPEC)
sys.modules["pretrain"] = pretrain  # its dataclasses look their module up
SPEC.loader.exec_module(pretrain)

UNIT = {"mean": 0.0, "std": 1.0}  # keeps the made values as they are
SHARED = list(pretrain.VOLUMES)  # left out: the tests do not need ../shared


def made_volumes(*shapes: tuple[int, int, int]) -> dict:
    rng = np.random.default_rng(0)
    return {
        f"v{k}": pretrain.Volume(rng.normal(size=shape).astype(np.float32), (1.0, 1.0, 1.0), f"v{k}")
        for k, shape in enumerate(shapes)
    }


def training_slices(volumes: dict) -> list[tuple[str, int]]:
    """(volume, z) of each row of the bank's axial table, in order: every 8th slice is held out."""
    every = pretrain.HOLD_OUT_EVERY
    return [
        (name, z) for name, v in volumes.items() for z in range(v.array.shape[2]) if z % every != every // 2
    ]


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
    bank = pretrain.PlaneBank(volumes, UNIT, torch.device("cpu"), zpairs=False)
    where = training_slices(volumes)
    assert len(bank.axial) == len(where)
    size = 12
    rows = torch.tensor([0, 3, len(where) - 1, 9, 12, 5, 14, 1])
    # rows 0-8: volume 0 (40 x 36), rows 9-14: volume 1 (30 x 33); some crops touch the far edges
    corners = torch.tensor([[0, 0], [28, 24], [18, 21], [10, 3], [3, 1], [0, 9], [11, 2], [6, 6]]).float()

    def source(k: int) -> torch.Tensor:
        name, z = where[int(rows[k])]
        return torch.from_numpy(volumes[name].array[:, :, z])

    # scale 1, each of the 8 flips/transposes: the pixels themselves
    codes = torch.arange(8)
    crops = bank.crop(bank.axial, rows, corners, torch.ones(8), codes, size)
    assert crops.shape == (8, 1, size, size)
    for k in range(8):
        a, b = (int(c) for c in corners[k])
        expected = flipped(source(k)[a : a + size, b : b + size], k)
        assert torch.equal(crops[k, 0], expected), f"crop {k}, code {k}"

    # scale 1/2: area resampling, the mean of 2 x 2 pixels (what F.interpolate(mode="area") gave)
    half = torch.tensor([[0, 0], [16, 12], [6, 9], [4, 2], [2, 0], [0, 8], [5, 7], [3, 5]]).float()
    crops = bank.crop(bank.axial, rows, half, torch.full((8,), 0.5), torch.zeros(8, dtype=torch.long), size)
    for k in range(8):
        a, b = (int(c) for c in half[k])
        region = source(k)[a : a + 2 * size, b : b + 2 * size]
        expected = F.interpolate(region[None, None], size=(size, size), mode="area")[0, 0]
        torch.testing.assert_close(crops[k, 0], expected)

    # scale 2: bilinear interpolation at half-pixel steps
    crops = bank.crop(
        bank.axial, rows, corners, torch.full((8,), 2.0), torch.zeros(8, dtype=torch.long), size
    )
    m = size // 2 + 1
    for k in range(8):
        a, b = (int(c) for c in corners[k])
        region = source(k)[a : a + m, b : b + m]
        expected = F.interpolate(
            region[None, None], size=(2 * m - 1,) * 2, mode="bilinear", align_corners=True
        )
        torch.testing.assert_close(crops[k, 0], expected[0, 0, :size, :size])


def test_zplanes_are_coronal_and_sagittal_planes_with_z_last():
    volumes = made_volumes((20, 18, 16))
    bank = pretrain.PlaneBank(volumes, UNIT, torch.device("cpu"), zpairs=True)
    array = torch.from_numpy(volumes["v0"].array)
    assert len(bank.zplanes) == 18 + 20  # a coronal plane per y, a sagittal plane per x
    rows = torch.tensor([0, 17, 18, 37])  # coronal y = 0, 17; sagittal x = 0, 19
    corners = torch.tensor([[1, 2], [5, 0], [0, 3], [6, 4]]).float()
    crops = bank.crop(bank.zplanes, rows, corners, torch.ones(4), torch.zeros(4, dtype=torch.long), 12)
    assert torch.equal(crops[0, 0], array[1:13, 0, 2:14])
    assert torch.equal(crops[1, 0], array[5:17, 17, 0:12])
    assert torch.equal(crops[2, 0], array[0, 0:12, 3:15])
    assert torch.equal(crops[3, 0], array[19, 6:18, 4:16])


def test_drawn_crops_stay_inside_one_training_slice():
    # every slice holds one value, 100 * volume + z: a crop that crossed a plane's edge, or read a
    # held-out slice, would show another value
    volumes = made_volumes((40, 30, 9), (64, 70, 5))
    for k, v in enumerate(volumes.values()):
        v.array[:] = 100 * k + np.arange(v.array.shape[2], dtype=np.float32)
    bank = pretrain.PlaneBank(volumes, UNIT, torch.device("cpu"), zpairs=False)
    allowed = {
        100 * k + z for k, name in enumerate(volumes) for n, z in training_slices(volumes) if n == name
    }
    generator = torch.Generator().manual_seed(0)
    scales = (math.log(0.5), math.log(1.25))
    crops = bank.draw(bank.axial, 256, 24, scales, generator)[:, 0]
    assert crops.shape == (256, 24, 24)
    values = crops.flatten(1)
    torch.testing.assert_close(values, values[:, :1].expand_as(values), rtol=0, atol=1e-4)
    seen = {round(float(v)) for v in values[:, 0]}
    assert seen <= allowed and len(seen) > len(allowed) // 2
    again = bank.draw(bank.axial, 256, 24, scales, torch.Generator().manual_seed(0))[:, 0]
    assert torch.equal(crops, again), "the same generator state draws the same batch"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ct")
    for seed, shape in enumerate([(48, 44, 14), (40, 40, 12)]):
        save_nifti(
            ct_phantom(shape, (1.0, 1.0, 1.0), seed=seed),
            (1.0, 1.0, 1.0),
            str(folder / f"made_{seed}.nii.gz"),
        )
    record = {"file": "made_0.nii.gz", "name": "made_0", "licence": "CC0", "attribution": "this test"}
    (folder / "sources.json").write_text(json.dumps({"series": [record]}))  # as benchmarks/fetch_ct.py writes
    return folder


def run(data_dir: Path, out: Path, *extra: str) -> dict:
    pretrain.main(
        ["--data", str(data_dir / "no_shared"), "--data_dir", str(data_dir), "--leave_out", *SHARED]
        + ["--factors", "2", "--preset", "tiny", "--patch", "24", "--planes", "4", "--threads", "1"]
        + ["--lr", "1e-3", "--lr_min", "1e-3", "--log_every", "2", "--out", str(out), *extra]
    )
    return json.loads((out / "prior_x2.json").read_text())


def test_short_run_writes_the_prior_and_resume_continues_it(data_dir, tmp_path):
    card = run(data_dir, tmp_path / "leases", "--steps", "3")
    assert card["iterations"] == 3 and card["factor"] == 2
    assert sorted(card["data"]) == ["made_0", "made_1"] and card["data"]["made_0"]["shape"] == [48, 44, 14]
    assert card["data"]["made_0"]["licence"] == "CC0" and "licence" not in card["data"]["made_1"]
    (lease,) = card["leases"]
    assert lease["steps"] == 3 and lease["device"] == "cpu" and lease["samples_per_s"] > 0
    first_curve = card["validation"]["curve"]
    assert [p["iteration"] for p in first_curve] == [0, 3]
    net = build_network(2, PRESETS["tiny"], pretrain.METHOD)
    net.load_state_dict(torch.load(tmp_path / "leases" / "prior_x2.pt", weights_only=True))

    card = run(data_dir, tmp_path / "leases", "--steps", "2", "--resume")
    assert card["iterations"] == 5
    assert [lease["first_step"] for lease in card["leases"]] == [0, 3]
    assert [lease["steps"] for lease in card["leases"]] == [3, 2]
    curve = card["validation"]["curve"]
    assert curve[: len(first_curve)] == first_curve, "the first lease's curve is kept"
    assert [(p["iteration"], p["lease"]) for p in curve[len(first_curve) :]] == [(5, 2)]

    # the two leases train exactly what one run of 5 steps trains (constant rate: the schedule is
    # by time, and the two runs take different times)
    run(data_dir, tmp_path / "one_run", "--steps", "5")
    resumed = torch.load(tmp_path / "leases" / "prior_x2.ckpt", weights_only=False)
    straight = torch.load(tmp_path / "one_run" / "prior_x2.ckpt", weights_only=False)
    assert resumed["state"]["step"] == straight["state"]["step"] == 5
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key


def test_a_slice_too_small_for_the_patch_is_named(tmp_path):
    volumes = made_volumes((40, 36, 10), (20, 18, 6))
    bank = pretrain.PlaneBank(volumes, UNIT, torch.device("cpu"), zpairs=False)
    with pytest.raises(SystemExit, match="v1: axial slices of 20 x 18 pixels"):
        bank.check_fits(24, 1.25)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a step's host synchronisations")
def test_a_step_does_not_wait_for_the_gpu():
    # after a first step (which moves the wavelet filters and tunes cuDNN), drawing a batch and a
    # whole training step queue GPU work only: torch raises on any synchronising call
    device = torch.device("cuda")
    volumes = made_volumes((64, 60, 12), (48, 50, 9))
    bank = pretrain.PlaneBank(volumes, UNIT, device, zpairs=False)
    net = build_network(2, PRESETS["tiny"], pretrain.METHOD).to(device)
    iteration = pretrain.build_iteration(2, 0, dict(pretrain.METHOD))
    iteration.inplane_scale = 1.0
    optimizer = torch.optim.Adam(net.parameters(), 1e-3, fused=True)
    generator = torch.Generator(device=device).manual_seed(0)
    running = torch.zeros((), device=device)

    def step():
        planes = bank.draw(bank.axial, 16, 32, (math.log(0.5), math.log(1.25)), generator)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = pretrain.pair_losses(net, iteration, planes, None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running.add_(loss.detach())

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(float(running))
