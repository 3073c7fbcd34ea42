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


def synthesized_mask(length: int, factor: int, device=None) -> torch.Tensor:
    """(length,) bool, True along z where a slice is synthesized (not a multiple of r): the positions
    every loss, validation and score is computed on."""
    mask = torch.ones(length, dtype=torch.bool, device=device)
    mask[::factor] = False
    return mask


def internal_pair(
    volume: torch.Tensor, factor: int, profile: str = "removal"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Internal-learning pair from a thick patch V: (D_r(V), V cropped to the covered slices)."""
    target = volume[..., : covered(volume.shape[-1], factor)]
    return degrade_last(target, factor, profile), target


def area_half_width(step: torch.Tensor) -> torch.Tensor:
    """Offset of an output pixel's two sub-samples from its centre: (step - 1) / 2 source pixels when
    shrinking (``step`` > 1 source pixels per output pixel), 0 when enlarging."""
    return ((step - 1) / 2).clamp(min=0)


def resampling_taps(corner: torch.Tensor, step: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The one in-plane resampler of the project, along one axis, as taps and weights.

    Output pixel i of a line whose first source sample sits at ``corner`` (source pixels) and that
    advances ``step`` source pixels per output pixel is the mean of two linear-interpolation samples
    ``area_half_width(step)`` either side of its centre: shrinking by 2 this is area resampling (the
    mean of 2 pixels, as ``F.interpolate(mode="area")``), at step 1 the pixels themselves, enlarging
    linear interpolation. Per-scan training (``inplane_planes``) and the prior's pretraining crops
    (``icmd_auto.pretrain.PlaneBank``) both resample through it, so the pairs a prior learns from
    and those a warm start fine-tunes on are made alike at every scale.

    Args:
        corner, step: (N,) float tensors, one line each.
        size: output pixels per line.

    Returns:
        taps (N, size, 4) int64 source indices (not clamped: the caller clamps to its line, where a
        tap outside it has weight 0 or duplicates the edge) and weights (N, size, 4) summing to 1.
    """
    half = area_half_width(step)
    i = torch.arange(size, device=step.device, dtype=step.dtype)
    centre = corner[:, None] + half[:, None] + i * step[:, None]  # (N, size)
    taps, weights = [], []
    for sign in (-1.0, 1.0):  # the two sub-samples
        position = centre + sign * half[:, None]
        floor = position.floor()
        frac = position - floor
        taps += [floor, floor + 1]
        weights += [(1 - frac) / 2, frac / 2]
    return torch.stack(taps, -1).long(), torch.stack(weights, -1)


def resampling_matrix(length: int, scale: float, device=None) -> torch.Tensor:
    """(round(length * scale), length): ``resampling_taps`` of a whole line, centred on it, as a matrix."""
    size = max(int(round(length * scale)), 8)
    step = torch.tensor([1.0 / scale], dtype=torch.float64, device=device)
    extent = (size - 1) * step + 2 * area_half_width(step)  # source pixels, first to last sample
    taps, weights = resampling_taps((length - 1 - extent) / 2, step, size)
    matrix = torch.zeros(size, length, dtype=torch.float64, device=device)
    matrix.scatter_add_(1, taps[0].clamp(0, length - 1), weights[0])
    return matrix


def inplane_planes(volume: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Axial slices of (B, 1, X, Y, Z) as planes (B*Z, 1, X', Y'), resampled by ``scale``.

    ``scale`` = in-plane spacing / target slice spacing: after resampling the pixel spacing
    equals the spacing the networks must produce along z, so degrading a plane by r along one
    axis gives a pair at exactly the test scale (no scale gap). Resampled by ``resampling_taps``.
    """
    b, _, x, y, z = volume.shape
    planes = volume[:, 0].permute(0, 3, 1, 2).reshape(b * z, 1, x, y)
    if abs(scale - 1.0) > 1e-3:
        rows = resampling_matrix(x, scale, planes.device).to(planes.dtype)
        columns = resampling_matrix(y, scale, planes.device).to(planes.dtype)
        planes = torch.einsum("hx,nxy,wy->nhw", rows, planes[:, 0], columns)[:, None]
    return planes


def inplane_pair(
    planes: torch.Tensor, factor: int, profile: str = "removal", transpose: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale-matched pair from axial planes (N, 1, H, W): degraded along W (or H if ``transpose``)."""
    if transpose:
        planes = planes.transpose(-1, -2)
    target = planes[..., : covered(planes.shape[-1], factor)]
    return degrade_last(target, factor, profile), target
