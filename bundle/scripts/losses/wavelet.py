"""Differentiable 2-D discrete wavelet transform and ICMD's wavelet high-frequency loss."""

from __future__ import annotations

import pywt
import torch
import torch.nn.functional as F
from torch import nn


def symmetric_pad_last(x: torch.Tensor, pad: int) -> torch.Tensor:
    """pywt's "symmetric" (half-sample) extension of the last axis by ``pad`` on both sides.

    Works for any ``pad``, also longer than the signal (the extension is periodic with 2N).
    """
    n = x.shape[-1]
    idx = torch.arange(-pad, n + pad, device=x.device) % (2 * n)
    idx = torch.where(idx < n, idx, 2 * n - 1 - idx)
    return x.index_select(-1, idx)


class DWT2D(nn.Module):
    """Multi-level 2-D DWT with pywavelets' filter bank, matching ``pywt.wavedec2(mode="symmetric")``.

    ``forward(x)`` with x (N, 1, H, W) returns, for levels t = 1..levels, the high-frequency
    coefficients of level t stacked as (N, 3, H_t, W_t) (the LH, HL and HH bands).

    One analysis step along an axis of length n is a linear map: symmetric extension, filtering
    and down-sampling by 2 form an (n, (n+L-1)//2) matrix per filter. Applying the matrices
    with matmul is much faster on CPUs than single-channel strided convolutions.
    """

    def __init__(self, wavelet: str = "db3", levels: int = 3):
        super().__init__()
        w = pywt.Wavelet(wavelet)
        self.levels = levels
        # conv1d is a correlation; pywt convolves, so the filters are reversed
        self.register_buffer("lo", torch.tensor(w.dec_lo[::-1], dtype=torch.float64).view(1, 1, -1))
        self.register_buffer("hi", torch.tensor(w.dec_hi[::-1], dtype=torch.float64).view(1, 1, -1))
        self._matrices: dict = {}

    def analysis_matrices(self, n: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, m) low- and high-pass analysis matrices for signals of length n, m = (n+L-1)//2."""
        key = (n, dtype, str(device))
        if key not in self._matrices:
            length = self.lo.shape[-1]
            eye = torch.eye(n, dtype=torch.float64, device=self.lo.device).unsqueeze(1)  # n unit signals
            ext = symmetric_pad_last(eye, length - 1)[..., 1:]
            lo = F.conv1d(ext, self.lo, stride=2)[:, 0]
            hi = F.conv1d(ext, self.hi, stride=2)[:, 0]
            self._matrices[key] = (lo.to(dtype=dtype, device=device), hi.to(dtype=dtype, device=device))
        return self._matrices[key]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        highs = []
        approx = x[:, 0]
        for _ in range(self.levels):
            lo_h, hi_h = self.analysis_matrices(approx.shape[-2], approx.dtype, approx.device)
            lo_w, hi_w = self.analysis_matrices(approx.shape[-1], approx.dtype, approx.device)
            lo_rows = lo_h.t() @ approx  # along H
            hi_rows = hi_h.t() @ approx
            approx, lh = lo_rows @ lo_w, lo_rows @ hi_w  # along W
            hl, hh = hi_rows @ lo_w, hi_rows @ hi_w
            highs.append(torch.stack([lh, hl, hh], dim=1))
        return highs


class WaveletHighFrequencyLoss(nn.Module):
    """sum_{t=1..levels} MSE(WT^(t)(pred), WT^(t)(target)) on (N, 1, H, W) planes (ICMD, L^int).

    WT^(t) are the LH, HL, HH coefficients of level t; the MSE is the mean over all of them.
    """

    def __init__(self, wavelet: str = "db3", levels: int = 3):
        super().__init__()
        self.dwt = DWT2D(wavelet, levels)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(F.mse_loss(p, t) for p, t in zip(self.dwt(pred), self.dwt(target)))
