"""Building blocks shared by the view networks (RCAN / HAN family).

All blocks are 2-D and shape-preserving: (B, C, H, W) -> (B, C, H, W).
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation channel attention (RCAN): x * sigmoid(MLP(avgpool(x)))."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.body = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.body(x)


class RCAB(nn.Module):
    """Residual channel-attention block: x + CA(conv(relu(conv(x))))."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
            ChannelAttention(channels, reduction),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResidualGroup(nn.Module):
    """``blocks`` RCABs and a closing conv, with a skip over the group."""

    def __init__(self, channels: int, blocks: int, reduction: int = 8):
        super().__init__()
        self.body = nn.Sequential(
            *[RCAB(channels, reduction) for _ in range(blocks)], nn.Conv2d(channels, channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class LayerAttention(nn.Module):
    """HAN's layer attention module: re-weights the N group outputs by their correlations.

    (B, N, C, H, W) -> (B, C, H, W): softmax(F F^T) F with F the (N, C*H*W) feature matrix,
    scaled by a learned ``scale`` (initialised to 0, so training starts from the plain sum)
    and added to the input, then the N groups are fused by a 1x1 conv.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(1))
        self.fuse = nn.Conv2d(channels * groups, channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, n, c, h, w = features.shape
        flat = features.reshape(b, n, -1)
        # normalise by the feature length so the softmax does not saturate on large planes
        energy = torch.bmm(flat, flat.transpose(1, 2)) / flat.shape[-1]
        attention = torch.softmax(energy, dim=-1)
        out = torch.bmm(attention, flat).reshape(b, n, c, h, w)
        out = self.scale * out + features
        return self.fuse(out.reshape(b, n * c, h, w))


class ChannelSpatialAttention(nn.Module):
    """HAN's channel-spatial attention module (CSAM), with a 2-D conv in place of HAN's 3-D one.

    A 3x3 conv over the (C, H, W) feature gives a joint channel-spatial attention map; the
    result, scaled by a learned ``scale`` (initialised to 0), is added to the input.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(1))
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * (x * torch.sigmoid(self.conv(x)))
