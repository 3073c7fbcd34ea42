"""Memory-bank regularisation at G_a's bottleneck (ICMD, L^com and L^sep)."""

from __future__ import annotations

import torch


def memory_losses(
    features: torch.Tensor, p: torch.Tensor, items: torch.Tensor, margin: float = 1.0, reduction: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """L^com and L^sep.

    L^com = sum_{i,x,y} || E_3^i[x,y] - M[z_pos] ||_2,  z_pos = argmax_z p[x,y,z]
    L^sep = sum_{i,x,y} max(|| E_3^i[x,y] - M[z_pos] ||_2 - || E_3^i[x,y] - M[z_neg] ||_2 + alpha, 0),
            z_neg the second most likely item.

    Args:
        features: E_3, (N, C, h, w).
        p: memory weights, (N, h, w, L).
        items: M, (L, C).
        margin: alpha.
        reduction: "sum" (the poster's formula) or "mean" over the N*h*w positions, which keeps
            the 0.1 weight independent of patch and batch size (the default; bundle/docs).
    """
    query = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])  # (P, C)
    top2 = torch.topk(p.reshape(-1, p.shape[-1]), 2, dim=-1).indices  # (P, 2)
    d_pos = torch.linalg.vector_norm(query - items[top2[:, 0]], dim=-1)
    d_neg = torch.linalg.vector_norm(query - items[top2[:, 1]], dim=-1)
    com = d_pos
    sep = torch.clamp(d_pos - d_neg + margin, min=0)
    if reduction == "sum":
        return com.sum(), sep.sum()
    if reduction == "mean":
        return com.mean(), sep.mean()
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
