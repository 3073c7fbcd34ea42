"""The simulated-thick evaluation protocol: metrics and the classical baselines.

Ground truth G (thin) -> input D_r(G) -> prediction on the thin grid -> compare with G over the
covered slices. HU are clipped to [-1024, 3071] and scaled to [0, 1] (data range 1).
PSNR on all voxels and on synthesized slices only; SSIM averaged over the axial (SSIM_a),
coronal (SSIM_c) and sagittal (SSIM_s) slices of the volume (the seed's table).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import SSIMMetric
from scipy.interpolate import make_interp_spline

from .degradation import synthesized_mask  # noqa: F401  (scores are on its positions; re-exported)

HU_RANGE = (-1024.0, 3071.0)
BASELINES = ("nearest", "linear", "cubic")


def to_unit(hu: torch.Tensor) -> torch.Tensor:
    lo, hi = HU_RANGE
    return (torch.as_tensor(hu, dtype=torch.float64).clamp(lo, hi) - lo) / (hi - lo)


def psnr(pred: torch.Tensor, reference: torch.Tensor) -> float:
    mse = float(torch.mean((pred - reference) ** 2))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(1.0 / mse))


def _ssim_planes(pred: torch.Tensor, reference: torch.Tensor, batch: int = 64) -> float:
    """Mean SSIM over planes (N, H, W), data range 1, 7x7 Gaussian window when planes are small."""
    size = min(pred.shape[-2:])
    win = 11 if size >= 11 else (size if size % 2 else size - 1)
    metric = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=max(win, 3))
    values = []
    for start in range(0, pred.shape[0], batch):
        p = pred[start : start + batch, None].float()
        r = reference[start : start + batch, None].float()
        values.append(metric(p, r).reshape(-1))
    return float(torch.cat(values).mean())


def score(pred_hu: torch.Tensor, reference_hu: torch.Tensor, factor: int) -> dict[str, float]:
    """PSNR (all, synthesized only) and SSIM_a/c/s of a (X, Y, Z') prediction against the reference."""
    pred, ref = to_unit(pred_hu), to_unit(reference_hu)
    syn = synthesized_mask(ref.shape[-1], factor)
    return {
        "psnr_all": psnr(pred, ref),
        "psnr_syn": psnr(pred[..., syn], ref[..., syn]),
        "ssim_a": _ssim_planes(pred.permute(2, 0, 1), ref.permute(2, 0, 1)),
        "ssim_c": _ssim_planes(pred.permute(1, 0, 2), ref.permute(1, 0, 2)),
        "ssim_s": _ssim_planes(pred, ref),
    }


def interpolate_z(thick: torch.Tensor | np.ndarray, factor: int, method: str = "linear") -> torch.Tensor:
    """Classical slice interpolation along z: (X, Y, Z) -> (X, Y, (Z-1)*r+1), known slices exact.

    method: "nearest", "linear", or "cubic" (interpolating cubic B-spline, not-a-knot ends).
    """
    thick = torch.as_tensor(thick, dtype=torch.float64)
    z = thick.shape[-1]
    grid = torch.arange((z - 1) * factor + 1, dtype=torch.float64) / factor
    if method == "nearest":
        return thick[..., torch.round(grid).long().clamp(max=z - 1)]
    if method == "linear":
        i0 = grid.floor().long().clamp(max=z - 2)
        w = grid - i0
        return thick[..., i0] * (1 - w) + thick[..., i0 + 1] * w
    if method == "cubic":
        if z < 4:
            return interpolate_z(thick, factor, "linear")
        spline = make_interp_spline(np.arange(z), thick.numpy(), k=3, axis=-1)
        return torch.from_numpy(spline(grid.numpy()))
    raise ValueError(f"unknown interpolation {method!r}; use one of {BASELINES}")
