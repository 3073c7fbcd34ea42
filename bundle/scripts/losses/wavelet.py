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
    """

    def __init__(self, wavelet: str = "db3", levels: int = 3):
        super().__init__()
        w = pywt.Wavelet(wavelet)
        self.levels = levels
        # conv1d is a correlation; pywt convolves, so the filters are reversed
        self.register_buffer("lo", torch.tensor(w.dec_lo[::-1], dtype=torch.float32).view(1, 1, -1))
        self.register_buffer("hi", torch.tensor(w.dec_hi[::-1], dtype=torch.float32).view(1, 1, -1))

    def _analysis_last(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One analysis step along the last axis: (..., N) -> lowpass, highpass (..., (N+L-1)//2)."""
        length = self.lo.shape[-1]
        shape = x.shape
        flat = symmetric_pad_last(x.reshape(-1, 1, shape[-1]), length - 1)[..., 1:]
        lo = F.conv1d(flat, self.lo.to(x.dtype), stride=2)
        hi = F.conv1d(flat, self.hi.to(x.dtype), stride=2)
        return lo.reshape(*shape[:-1], -1), hi.reshape(*shape[:-1], -1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        highs = []
        approx = x[:, 0]
        for _ in range(self.levels):
            lo_rows, hi_rows = self._analysis_last(approx.transpose(-1, -2))  # along H
            lo_rows, hi_rows = lo_rows.transpose(-1, -2), hi_rows.transpose(-1, -2)
            approx, lh = self._analysis_last(lo_rows)  # along W
            hl, hh = self._analysis_last(hi_rows)
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
