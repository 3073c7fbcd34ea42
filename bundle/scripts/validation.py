"""Self-supervised validation: PSNR on pairs made from held-out thick slices (no thin ground truth).

``train.json`` crops the last ``validation#holdout_slices`` thick slices (h, a multiple of r) off
every training volume before any patch is drawn, so no training pair ever contains them. The
validation item of a volume is those h slices and the last training slice before them,
(1, X, Y, h + 1) in standardised units. From it:

- G_c / G_s: every held-out axial slice, resampled by ``inplane_scale`` and degraded by r along
  y (G_c) or x (G_s): scale-matched in-plane pairs, built as the training's in-plane pairs are;
- G_a: the item's internal pair: D_r keeps the training slice and every r-th held-out slice, and
  G_a predicts the held-out slices between them (the training slice is an input only).

PSNR follows the evaluation protocol (HU clipped to [-1024, 3071], scaled to [0, 1]) on the
synthesized positions only, pooled over the planes of one view of one volume: the engine's
output holds one item per (volume, view), and the key metric ``val_psnr`` is the mean over the
items of the views the fusion uses (``view_metrics`` adds one metric per view).
"""

from __future__ import annotations

from typing import Any

import torch
from monai.handlers import PeakSignalToNoiseRatio

from .degradation import inplane_pair, inplane_planes, internal_pair, synthesized_mask
from .evaluation import to_unit
from .networks import FUSIONS
from .runtime import autocast
from .training import engine_precision


class SelfSupervisedValidation:
    """``iteration_update(engine, batch)`` for MONAI's SupervisedEvaluator.

    ``batch["image"]``: validation items (B, 1, X, Y, h + 1), standardised (module docstring).
    Returns a list of dicts, one per (item, view): ``pred`` and ``label`` (1, N, H, W) on the
    [0, 1] scale of the evaluation protocol, synthesized positions only, and ``view``.

    Args:
        factor: r.
        fusion: the network's fusion; the views it uses are validated.
        mean, std: the standardisation (HU = x * std + mean).
        slice_profile: D_r, as in training.
        inplane_scale: in-plane spacing / target slice spacing, as in training.
    """

    def __init__(
        self,
        factor: int,
        fusion: str,
        mean: float,
        std: float,
        slice_profile: str = "removal",
        inplane_scale: float = 1.0,
    ):
        self.factor, self.views = factor, FUSIONS[fusion]
        self.mean, self.std = float(mean), float(std)
        self.slice_profile, self.inplane_scale = slice_profile, inplane_scale

    def unit(self, x: torch.Tensor) -> torch.Tensor:
        return to_unit(x.float() * self.std + self.mean)

    def inplane(self, net, view: str, held_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """G_c / G_s on the held-out slices (1, 1, X, Y, h): (prediction, target) planes (N, H, W)."""
        planes = inplane_planes(held_out, self.inplane_scale)
        low, target = inplane_pair(planes, self.factor, self.slice_profile, transpose=(view == "s"))
        pred = net.view_network(view)(low)[..., : target.shape[-1]]
        syn = synthesized_mask(target.shape[-1], self.factor).to(target.device)
        return pred[:, 0, :, syn], target[:, 0, :, syn]

    def axial(self, net, item: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """G_a on the internal pair of the item (1, 1, X, Y, h + 1): (prediction, target) slices (N, X, Y)."""
        low, target = internal_pair(item, self.factor, self.slice_profile)
        pred = net.axial_view(low)[0][..., : target.shape[-1]]
        syn = synthesized_mask(target.shape[-1], self.factor).to(target.device)
        return pred[0, 0][..., syn].permute(2, 0, 1), target[0, 0][..., syn].permute(2, 0, 1)

    def __call__(self, engine: Any, batchdata: dict) -> list[dict]:
        volume = batchdata["image"].to(engine.state.device)
        volume = volume.as_tensor() if hasattr(volume, "as_tensor") else volume
        net = engine.network.module if hasattr(engine.network, "module") else engine.network
        net.eval()
        items = []
        with torch.no_grad(), autocast(volume.device, engine_precision(engine)):
            for item in volume.split(1):
                for view in self.views:
                    pred, target = (
                        self.axial(net, item) if view == "a" else self.inplane(net, view, item[..., 1:])
                    )
                    items.append(
                        {"pred": self.unit(pred)[None], "label": self.unit(target)[None], "view": view}
                    )
        return items


def view_items(view: str):
    """An output transform: (preds, labels) of the items of one view."""

    def select(output: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        chosen = [o for o in output if o["view"] == view]
        return [o["pred"] for o in chosen], [o["label"] for o in chosen]

    return select


def view_metrics(fusion: str) -> dict[str, PeakSignalToNoiseRatio]:
    """``val_psnr_<view>`` for each view the fusion uses (the evaluator's additional metrics)."""
    return {
        f"val_psnr_{v}": PeakSignalToNoiseRatio(max_val=1.0, output_transform=view_items(v))
        for v in FUSIONS[fusion]
    }
