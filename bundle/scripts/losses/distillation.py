"""Cross-view mutual distillation over the best-agreeing positions (ICMD, L_v^n)."""

from __future__ import annotations

import math

import torch


def agreement_mask(squared_difference: torch.Tensor, gamma: float) -> torch.Tensor:
    """T(gamma): True at the fraction ``gamma`` of positions with the smallest squared difference.

    At least one position is kept; ties at the threshold are broken by position order.
    """
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    flat = squared_difference.detach().reshape(-1)
    keep = max(1, math.ceil(gamma * flat.numel()))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if keep >= flat.numel():
        mask[:] = True
    else:
        mask[torch.topk(flat, keep, largest=False).indices] = True
    return mask.reshape(squared_difference.shape)


def cross_view_distillation(
    axial: torch.Tensor,
    other: torch.Tensor,
    gamma: float,
    synthesized: torch.Tensor,
    detach_axial: bool = False,
) -> torch.Tensor:
    """L_v^n = sum over T_v^n(gamma) of (O_a^n - O_v^n)^2 / |T_v^n(gamma)|.

    Args:
        axial: O_a^n, (B, 1, X, Y, Z') (or any shape matching ``other``).
        other: O_c^n or O_s^n, same shape.
        gamma: the fraction of synthesized positions kept (where the two views agree best).
        synthesized: bool mask along the last axis (Z',) of the positions that were synthesized.
        detach_axial: stop the gradient into G_a (the axial view only teaches).
    """
    a = axial.detach() if detach_axial else axial
    diff = (a - other)[..., synthesized] ** 2
    mask = agreement_mask(diff, gamma)
    return diff[mask].mean()
