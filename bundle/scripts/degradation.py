"""Thick-slice simulation D_r and the training pairs built from it.

A slice profile says how a thick slice relates to the thin ones:
    "removal": keep every r-th slice (the paper's protocol);
    "average": each kept slice is the mean of an r-slice slab centred on it (a box of width r;
               for even r the two end slices of the box weigh 1/2), closer to real thick slices.
Both keep the slice centres at 0, r, 2r, ..., so output slice r*k is input slice k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PROFILES = ("removal", "average")


def box_weights(factor: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The slab-average kernel along z: width r, centred; half weights at the ends for even r."""
    if factor % 2:
        w = torch.ones(factor, dtype=dtype, device=device)
    else:
        w = torch.ones(factor + 1, dtype=dtype, device=device)
        w[0] = w[-1] = 0.5
    return w / w.sum()


def degrade_last(x: torch.Tensor, factor: int, profile: str = "removal") -> torch.Tensor:
    """D_r along the last axis: (..., Z) -> (..., ceil(Z / r)), samples at 0, r, 2r, ..."""
    if profile == "removal":
        return x[..., ::factor]
    if profile != "average":
        raise ValueError(f"slice profile must be one of {PROFILES}, got {profile!r}")
    w = box_weights(factor, x.dtype, x.device)
    half = (w.numel() - 1) // 2
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1])
    flat = F.pad(flat, (half, half), mode="replicate")
    out = F.conv1d(flat, w.view(1, 1, -1))[..., ::factor]
    return out.reshape(*shape[:-1], out.shape[-1])


def covered(length: int, factor: int) -> int:
    """Slices of the thin grid covered by ``length`` thin slices after D_r: (ceil(n/r)-1)*r+1."""
    return ((length - 1) // factor) * factor + 1


def internal_pair(
    volume: torch.Tensor, factor: int, profile: str = "removal"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Internal-learning pair from a thick patch V: (D_r(V), V cropped to the covered slices)."""
    target = volume[..., : covered(volume.shape[-1], factor)]
    return degrade_last(target, factor, profile), target


def inplane_planes(volume: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Axial slices of (B, 1, X, Y, Z) as planes (B*Z, 1, X, Y), resampled by ``scale``.

    ``scale`` = in-plane spacing / target slice spacing: after resampling the pixel spacing
    equals the spacing the networks must produce along z, so degrading a plane by r along one
    axis gives a pair at exactly the test scale (no scale gap).
    """
    b, _, x, y, z = volume.shape
    planes = volume[:, 0].permute(0, 3, 1, 2).reshape(b * z, 1, x, y)
    if abs(scale - 1.0) > 1e-3:
        size = (max(int(round(x * scale)), 8), max(int(round(y * scale)), 8))
        mode = "area" if scale < 1 else "bilinear"
        planes = F.interpolate(
            planes, size=size, mode=mode, **({} if mode == "area" else {"align_corners": False})
        )
    return planes


def inplane_pair(
    planes: torch.Tensor, factor: int, profile: str = "removal", transpose: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale-matched pair from axial planes (N, 1, H, W): degraded along W (or H if ``transpose``)."""
    if transpose:
        planes = planes.transpose(-1, -2)
    target = planes[..., : covered(planes.shape[-1], factor)]
    return degrade_last(target, factor, profile), target
