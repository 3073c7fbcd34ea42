"""G_a: axial slice interpolation (CAIN-like encoder-decoder with a memory bank at E_3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ResidualGroup
from .memory import MemoryBank

DOWNSAMPLING = 8  # three stages of pixel-unshuffle by 2: the bottleneck E_3 is at h/8 x w/8


class AxialSliceInterpolator(nn.Module):
    """Predict the r-1 axial slices between two known slices in one pass.

    (N, K, X, Y) -> (N, r-1, X, Y), K = 2 known slices (or 4: the two outer ones add context;
    the slices are predicted between the centre two). Three down-sampling stages
    (pixel-unshuffle by 2 and a conv each) take the slices to the bottleneck E_3 at
    (X/8, Y/8), residual channel-attention groups work there, the memory bank's read-out is
    concatenated to E_3, and three pixel-shuffle stages with skips from E_2, E_1 decode. The
    network predicts a residual on linear interpolation between the centre two slices.
    X and Y need not be multiples of 8 (reflect-padded inside).

    ``forward`` returns ``(slices, aux)`` with ``aux = {"e3": E_3, "p": memory weights}``
    (``p`` only with a memory bank), which the memory losses L^com / L^sep need.

    Args:
        factor: r.
        in_slices: K, 2 or 4.
        width: channels at E_3 (E_1 has width/4, E_2 width/2).
        groups: residual groups at the bottleneck before and after the memory read-out.
        blocks: channel-attention blocks per group.
        mem_items: L, the memory bank's items; 0 means no memory bank.
        input_window: (low, high) the encoder clamps its input to; the linear base is unclamped.
    """

    def __init__(
        self,
        factor: int,
        in_slices: int = 2,
        width: int = 64,
        groups: int = 1,
        blocks: int = 2,
        mem_items: int = 10,
        reduction: int = 8,
        input_window: tuple[float, float] | None = None,
    ):
        super().__init__()
        self.input_window = tuple(input_window) if input_window is not None else None
        if in_slices not in (2, 4):
            raise ValueError(f"in_slices must be 2 or 4, got {in_slices}")
        self.factor, self.in_slices = factor, in_slices
        c1, c2, c3 = max(width // 4, 8), max(width // 2, 8), width
        out = factor - 1
        self.down1 = nn.Sequential(
            nn.PixelUnshuffle(2), nn.Conv2d(4 * in_slices, c1, 3, padding=1), nn.ReLU(True)
        )
        self.down2 = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(4 * c1, c2, 3, padding=1), nn.ReLU(True))
        self.down3 = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(4 * c2, c3, 3, padding=1))
        self.encoder = nn.Sequential(*[ResidualGroup(c3, blocks, reduction) for _ in range(groups)])
        self.memory = MemoryBank(c3, mem_items) if mem_items > 0 else None
        self.merge = nn.Conv2d(2 * c3 if self.memory is not None else c3, c3, 1)
        self.decoder = nn.Sequential(*[ResidualGroup(c3, blocks, reduction) for _ in range(groups)])
        self.up3 = nn.Sequential(nn.Conv2d(c3, 4 * c2, 3, padding=1), nn.PixelShuffle(2), nn.ReLU(True))
        self.up2 = nn.Sequential(nn.Conv2d(c2, 4 * c1, 3, padding=1), nn.PixelShuffle(2), nn.ReLU(True))
        self.up1 = nn.Sequential(nn.Conv2d(c1, 4 * out, 3, padding=1), nn.PixelShuffle(2))
        nn.init.zeros_(self.up1[0].weight)
        nn.init.zeros_(self.up1[0].bias)

    def forward(self, slices: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x_size, y_size = slices.shape[-2:]
        pad_x, pad_y = (-x_size) % DOWNSAMPLING, (-y_size) % DOWNSAMPLING
        x = slices.clamp(*self.input_window) if self.input_window else slices
        x = F.pad(x, (0, pad_y, 0, pad_x), mode="replicate") if pad_x or pad_y else x
        e1 = self.down1(x)
        e2 = self.down2(e1)
        e3 = self.encoder(self.down3(e2))
        aux = {"e3": e3}
        if self.memory is not None:
            readout, aux["p"] = self.memory(e3)
            d = self.merge(torch.cat([e3, readout], dim=1))
        else:
            d = self.merge(e3)
        d = self.up3(self.decoder(d) + e3) + e2
        d = self.up2(d) + e1
        residual = self.up1(d)[..., :x_size, :y_size]
        lo = self.in_slices // 2 - 1
        a, b = slices[:, lo : lo + 1], slices[:, lo + 1 : lo + 2]
        w = (
            torch.arange(1, self.factor, dtype=slices.dtype, device=slices.device).view(1, -1, 1, 1)
            / self.factor
        )
        return a * (1 - w) + b * w + residual, aux
