"""G_c / G_s: coronal and sagittal pixel interpolation along z (HAN-style, Niu et al. 2020)."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ChannelSpatialAttention, LayerAttention, ResidualGroup

UPSAMPLERS = ("espcn", "han")


def linear_upsample_last(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Linear interpolation along the last axis onto the sub-pixel grid of ``factor`` x its length.

    (..., Z) -> (..., factor * Z); output ``factor*k`` is input ``k``. The ``factor-1`` outputs
    after the last input sample repeat it (they lie outside the covered range and are trimmed).
    """
    nxt = torch.cat([x[..., 1:], x[..., -1:]], dim=-1)
    w = torch.arange(factor, dtype=x.dtype, device=x.device) / factor
    out = x.unsqueeze(-1) * (1 - w) + nxt.unsqueeze(-1) * w
    return out.flatten(-2)


def subpixel_last(x: torch.Tensor, factor: int) -> torch.Tensor:
    """1-D sub-pixel shuffle along the last axis: (B, C*r, H, Z) -> (B, C, H, r*Z)."""
    b, cr, h, z = x.shape
    c = cr // factor
    return x.reshape(b, c, factor, h, z).permute(0, 1, 3, 4, 2).reshape(b, c, h, z * factor)


class HANInterpolator(nn.Module):
    """Pixel interpolation of a 2-D plane along its last axis by an integer factor.

    (N, 1, H, Z) -> (N, 1, H, r*Z): the body runs at the input resolution (residual groups of
    channel-attention blocks, layer attention over the group outputs, channel-spatial attention),
    a 1-D sub-pixel layer upsamples along Z only, and the network predicts a residual on linear
    interpolation. Output ``r*k`` sits on input sample ``k``; callers keep the first
    ``(Z-1)*r+1`` outputs (the rest extrapolate past the last sample).

    Args:
        factor: r, the up-sampling factor along Z.
        width: feature channels.
        groups: residual groups.
        blocks: channel-attention blocks per group.
        reduction: channel-attention squeeze ratio.
        input_window: (low, high) the feature branch clamps its input to (standardised units);
            the linear base uses the input unclamped, so bone or metal beyond the window keep
            their values instead of being cut at the window's edge.
        upsampler: "espcn" (a 3x3 conv to r channels at the input resolution, then the 1-D
            sub-pixel shuffle: ESPCN's tail) or "han" (a conv to ``width * r`` channels, the
            shuffle, and a 3x3 conv at the output resolution: RCAN/HAN's tail, ~1.3x the
            FLOPs and a ``width``-channel map at r x the plane's size). docs/PERFORMANCE.md
            gives the measured speed and quality of both.

    Every operation is per plane: the attention statistics (channel attention's pooling, the
    layer attention's Gram matrix) span the whole plane the network is given, so a plane's
    output does not depend on which other planes share its batch.
    """

    def __init__(
        self,
        factor: int,
        width: int = 32,
        groups: int = 2,
        blocks: int = 2,
        reduction: int = 8,
        input_window: tuple[float, float] | None = None,
        upsampler: str = "espcn",
    ):
        super().__init__()
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler must be one of {UPSAMPLERS}, got {upsampler!r}")
        self.factor, self.upsampler = factor, upsampler
        self.input_window = tuple(input_window) if input_window is not None else None
        self.head = nn.Conv2d(1, width, 3, padding=1)
        self.groups = nn.ModuleList([ResidualGroup(width, blocks, reduction) for _ in range(groups)])
        self.layer_attention = LayerAttention(width, groups)
        self.csam = ChannelSpatialAttention(width)
        self.body_tail = nn.Conv2d(width, width, 3, padding=1)
        if upsampler == "han":
            self.upsample = nn.Conv2d(width, width * factor, 3, padding=1)
            self.tail = nn.Conv2d(width, 1, 3, padding=1)
        else:
            self.upsample = nn.Conv2d(width, factor, 3, padding=1)
            self.tail = None
        # start as linear interpolation: the residual branch begins at zero
        last = self.tail if self.tail is not None else self.upsample
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # features see the intensity window; the linear base carries what lies outside it
        head = self.head(x.clamp(*self.input_window) if self.input_window else x)
        feats, outs = head, []
        for group in self.groups:
            feats = group(feats)
            outs.append(feats)
        body = self.layer_attention(torch.stack(outs, dim=1)) + self.csam(outs[-1])
        body = self.body_tail(body) + head
        if self.tail is not None:
            residual = self.tail(torch.relu(subpixel_last(self.upsample(body), self.factor)))
        else:
            residual = subpixel_last(self.upsample(body), self.factor)
        return linear_upsample_last(x, self.factor) + residual
