"""The memory bank read at G_a's bottleneck E_3 (ICMD)."""

from __future__ import annotations

import torch
from torch import nn


class MemoryBank(nn.Module):
    """L learned items M (L, C), part of the state dict.

    ``forward(E)`` with E (N, C, h, w) returns the read-out (N, C, h, w) = sum_l p_l M_l and
    p (N, h, w, L) = softmax_l(E[x, y] . M_l).
    """

    def __init__(self, channels: int, items: int = 10):
        super().__init__()
        self.items = nn.Parameter(torch.randn(items, channels) / channels**0.5)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        query = features.permute(0, 2, 3, 1)  # (N, h, w, C)
        p = torch.softmax(query @ self.items.t(), dim=-1)
        readout = (p @ self.items).permute(0, 3, 1, 2)
        return readout, p
