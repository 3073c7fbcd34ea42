"""FinalizeSynthesisd: standardised prediction -> the HU volume on the thin grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from icmd_auto.template import scripts


@pytest.mark.parametrize("clip_image", [False, True])
def test_finalize_maps_back_to_hu_copies_known_slices_and_sets_geometry(clip_image):
    factor, z = 3, 4
    affine = torch.tensor(
        [[-1.5, 0, 0, 10], [0, -1.5, 0, 20], [0, 0, 4.5, 30], [0, 0, 0, 1]], dtype=torch.float64
    )
    source = MetaTensor(
        torch.arange(2 * 2 * z, dtype=torch.float32).reshape(1, 2, 2, z) * 100 - 1000, affine=affine
    )
    pred = torch.full((1, 2, 2, z * factor), 3.0)  # 3 std above the mean: 1300 HU, beyond the window's 1000
    finalize = scripts.transforms.FinalizeSynthesisd(
        "pred",
        "image_hu",
        factor,
        clip_low=-1000.0,
        clip_high=1000.0,
        mean=100.0,
        std=400.0,
        dtype="int16",
        clip_image=clip_image,
    )
    out = finalize({"pred": pred, "image_hu": source})["pred"]
    assert out.shape == (1, 2, 2, (z - 1) * factor + 1) and out.dtype == torch.int16
    assert torch.equal(out[..., ::factor], source.to(torch.int16)), "known slices copied bit-for-bit"
    synthesized = out[..., 1]
    assert torch.all(synthesized == (1000 if clip_image else 1300))
    expected = affine.clone()
    expected[2, 2] = 1.5
    assert np.allclose(out.affine.numpy(), expected.numpy())
