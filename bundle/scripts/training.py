"""One ICMD training iteration, as MONAI's ``iteration_update`` of a SupervisedTrainer.

Per batch of standardised thick patches V (B, 1, X, Y, Z):

1. internal learning, per view v: predict V from D_r(V) (the seed's pairs), optionally also
   scale-matched in-plane pairs for G_c / G_s (``inplane_pairs``);
   L_v^int = pixel(O_v, V) + wavelet_weight * sum_t MSE(WT^(t)(O_v), WT^(t)(V)) on view-v planes;
2. memory bank: L^com + L^sep at G_a's bottleneck;
3. cross-view mutual distillation at levels n = 1..stage (``engine.state.stage``, set by the
   DistillationSchedule handler): level 1 upsamples V itself, level n+1 each view's own level-n
   output; L_v^n on the ``gamma`` fraction of synthesized positions where views agree best.

Total L = sum_v L_v^int + lambda_cmd * sum_{v in cmd_views} L_v^cmd + lambda_mem * (L^com + L^sep).
The engine's output is a dict of floats, one per term (the metrics log writes them). With the
trainer's ``amp`` the losses are computed under ``runtime.autocast`` (``engine_precision``) and stepped
through the trainer's GradScaler when it has an enabled one (CUDA).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .degradation import covered, inplane_pair, inplane_planes, internal_pair, synthesized_mask
from .losses import WaveletHighFrequencyLoss, cross_view_distillation, memory_losses
from .runtime import autocast

LOSS_TERMS = ("int_a", "int_c", "int_s", "cmd_c", "cmd_s", "com", "sep", "total")


def engine_precision(engine: Any):
    """The engine's mixed precision (MONAI's ``amp`` and ``amp_kwargs``) as a ``runtime.autocast`` setting.

    With ``engine.amp``: ``amp_kwargs["dtype"]`` (train.json's ``amp_dtype``: bf16 by default, which
    has fp32's exponent range; fp16 overflowed in the paper preset's forward on an H200), else the
    device's own (``runtime.autocast_dtype(device, True)``). Without: None (float32).
    """
    if not getattr(engine, "amp", False):
        return None
    return (getattr(engine, "amp_kwargs", None) or {}).get("dtype") or True


def _sample(n: int, k: int, device) -> torch.Tensor:
    return torch.randperm(n, device=device)[: min(n, k)] if k > 0 else torch.arange(n, device=device)


class InternalLearningLoss(nn.Module):
    """L_v^int on planes (N, 1, H, W): pixel loss plus the weighted wavelet high-frequency loss."""

    def __init__(
        self,
        pixel_loss: str = "mse",
        use_wavelet: bool = True,
        wavelet: str = "db3",
        wavelet_weight: float = 1.0,
    ):
        super().__init__()
        if pixel_loss not in ("mse", "l1"):
            raise ValueError(f"pixel_loss must be 'mse' or 'l1', got {pixel_loss!r}")
        self.pixel = F.mse_loss if pixel_loss == "mse" else F.l1_loss
        self.wavelet = WaveletHighFrequencyLoss(wavelet) if use_wavelet and wavelet_weight > 0 else None
        self.wavelet_weight = wavelet_weight

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.pixel(pred, target)
        if self.wavelet is not None:
            loss = loss + self.wavelet_weight * self.wavelet(pred, target)
        return loss


class ICMDIteration:
    """``iteration_update(engine, batch)`` for MONAI's SupervisedTrainer.

    Args:
        factor: r.
        num_levels: N, distillation levels (the schedule may activate fewer).
        lambda_cmd: weight of L_c^cmd + L_s^cmd (0.15 in the seed).
        lambda_mem: weight of L^com + L^sep (0.1 in the seed).
        cmd_views: views distilled against the axial view, subset of ("c", "s").
        cmd_detach: stop the distillation gradient into G_a (the axial view only teaches).
        pixel_loss, use_wavelet, wavelet, wavelet_weight: the internal-learning loss.
        mem_margin: alpha of L^sep. mem_reduction: "mean" or "sum" over positions.
        slice_profile: "removal" | "average", D_r for all pairs.
        internal_pairs: train G_c / G_s on the seed's internal pairs (G_a always uses them).
        inplane_pairs: also train G_c / G_s on scale-matched in-plane pairs.
        inplane_scale: in-plane spacing / target slice spacing (the planner computes it).
        cmd_planes: coronal (and sagittal) planes per patch used for distillation, 0 = all.
        internal_planes: planes per patch for G_c / G_s internal and in-plane pairs, 0 = all.
        gamma: fallback when no schedule handler set ``engine.state.gamma``.
    """

    def __init__(
        self,
        factor: int,
        num_levels: int = 2,
        lambda_cmd: float = 0.15,
        lambda_mem: float = 0.1,
        cmd_views: tuple[str, ...] | list[str] = ("c", "s"),
        cmd_detach: bool = False,
        pixel_loss: str = "mse",
        use_wavelet: bool = True,
        wavelet: str = "db3",
        wavelet_weight: float = 1.0,
        mem_margin: float = 1.0,
        mem_reduction: str = "mean",
        slice_profile: str = "removal",
        internal_pairs: bool = True,
        inplane_pairs: bool = False,
        inplane_scale: float = 1.0,
        cmd_planes: int = 8,
        internal_planes: int = 0,
        gamma: float = 0.25,
    ):
        if set(cmd_views) - {"c", "s"}:
            raise ValueError(f"cmd_views must be a subset of ['c', 's'], got {cmd_views}")
        self.factor, self.num_levels = factor, num_levels
        self.lambda_cmd, self.lambda_mem = lambda_cmd, lambda_mem
        self.cmd_views, self.cmd_detach = tuple(cmd_views), cmd_detach
        self.internal_loss = InternalLearningLoss(pixel_loss, use_wavelet, wavelet, wavelet_weight)
        self.mem_margin, self.mem_reduction = mem_margin, mem_reduction
        self.slice_profile = slice_profile
        self.internal_pairs, self.inplane_pairs, self.inplane_scale = (
            internal_pairs,
            inplane_pairs,
            inplane_scale,
        )
        self.cmd_planes, self.internal_planes = cmd_planes, internal_planes
        self.gamma = gamma

    @classmethod
    def from_config(cls, icmd: dict, **kwargs) -> ICMDIteration:
        """The iteration of a bundle's ``icmd`` config section (as ``train#iteration`` builds it):
        the keys that are arguments of this class, absent ones at the defaults above; ``kwargs``
        (e.g. ``cmd_planes``) override them."""
        names = inspect.signature(cls.__init__).parameters
        return cls(**{**{k: v for k, v in icmd.items() if k in names and k != "self"}, **kwargs})

    # --- loss terms --------------------------------------------------------------------------

    def axial_internal(self, net, low: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """L_a^int on the synthesized axial slices, as axial planes."""
        out, aux = net.axial_view(low)
        out = out[..., : target.shape[-1]]
        syn = synthesized_mask(target.shape[-1], self.factor, target.device)
        pred = out[..., syn].permute(0, 4, 1, 2, 3).reshape(-1, 1, *out.shape[2:4])
        ref = target[..., syn].permute(0, 4, 1, 2, 3).reshape(-1, 1, *target.shape[2:4])
        return self.internal_loss(pred, ref), aux

    def planar_internal(self, net, view: str, low: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """L_c^int / L_s^int on coronal / sagittal planes of the internal pair."""
        planar = net.sagittal if (view == "s" and net.sagittal is not None) else net.coronal
        if view == "c":  # planes (X, Z) for each Y
            lo = low[:, 0].permute(0, 2, 1, 3)
            hi = target[:, 0].permute(0, 2, 1, 3)
        else:  # planes (Y, Z) for each X
            lo, hi = low[:, 0], target[:, 0]
        lo = lo.reshape(-1, 1, *lo.shape[2:])
        hi = hi.reshape(-1, 1, *hi.shape[2:])
        pick = _sample(lo.shape[0], self.internal_planes, lo.device)
        pred = planar(lo[pick])[..., : hi.shape[-1]]
        return self.internal_loss(pred, hi[pick])

    def planar_inplane(self, net, view: str, volume: torch.Tensor) -> torch.Tensor:
        """Scale-matched in-plane pairs: axial planes degraded along Y (for G_c) or X (for G_s)."""
        planar = net.sagittal if (view == "s" and net.sagittal is not None) else net.coronal
        planes = inplane_planes(volume, self.inplane_scale)
        pick = _sample(planes.shape[0], self.internal_planes, planes.device)
        low, target = inplane_pair(planes[pick], self.factor, self.slice_profile, transpose=(view == "s"))
        pred = planar(low)[..., : target.shape[-1]]
        return self.internal_loss(pred, target)

    def distillation(self, net, volume: torch.Tensor, stage: int, gamma: float) -> dict[str, torch.Tensor]:
        """L_c^cmd, L_s^cmd summed over levels 1..stage."""
        r = self.factor
        b, _, x, y, _ = volume.shape
        ys = _sample(y, self.cmd_planes, volume.device)
        xs = _sample(x, self.cmd_planes, volume.device)
        prev = {"a": volume, "c": volume[:, :, :, ys], "s": volume[:, :, xs]}
        terms = {v: volume.new_zeros(()) for v in self.cmd_views}
        for _ in range(stage):
            length = covered(prev["a"].shape[-1] * r, r)  # (Z-1)*r+1 of this level's input
            syn = synthesized_mask(length, r, volume.device)
            out_a = net.axial_view(prev["a"])[0][..., :length]
            new = {"a": out_a}
            if "c" in self.cmd_views:
                out_c = net.coronal_view(prev["c"])[..., :length]
                terms["c"] = terms["c"] + cross_view_distillation(
                    out_a[:, :, :, ys], out_c, gamma, syn, self.cmd_detach
                )
                new["c"] = out_c
            if "s" in self.cmd_views:
                out_s = net.sagittal_view(prev["s"])[..., :length]
                terms["s"] = terms["s"] + cross_view_distillation(
                    out_a[:, :, xs], out_s, gamma, syn, self.cmd_detach
                )
                new["s"] = out_s
            prev = new
        return terms

    # --- the iteration -------------------------------------------------------------------------

    def losses(self, net, volume: torch.Tensor, stage: int, gamma: float) -> dict[str, torch.Tensor]:
        zero = volume.new_zeros(())
        terms = {k: zero for k in LOSS_TERMS}
        low, target = internal_pair(volume, self.factor, self.slice_profile)
        if net.axial is not None:
            terms["int_a"], aux = self.axial_internal(net, low, target)
            if net.axial.memory is not None and self.lambda_mem > 0:
                terms["com"], terms["sep"] = memory_losses(
                    aux["e3"], aux["p"], net.axial.memory.items, self.mem_margin, self.mem_reduction
                )
        for view in ("c", "s"):
            if view not in net.views:
                continue
            if self.internal_pairs:
                terms[f"int_{view}"] = terms[f"int_{view}"] + self.planar_internal(net, view, low, target)
            if self.inplane_pairs:
                terms[f"int_{view}"] = terms[f"int_{view}"] + self.planar_inplane(net, view, volume)
        if stage > 0 and self.lambda_cmd > 0 and self.cmd_views and net.axial is not None:
            cmd = self.distillation(net, volume, stage, gamma)
            for view, value in cmd.items():
                terms[f"cmd_{view}"] = value
        terms["total"] = (
            terms["int_a"]
            + terms["int_c"]
            + terms["int_s"]
            + self.lambda_cmd * (terms["cmd_c"] + terms["cmd_s"])
            + self.lambda_mem * (terms["com"] + terms["sep"])
        )
        return terms

    def __call__(self, engine: Any, batchdata: dict) -> dict[str, float]:
        volume = batchdata["image"].to(
            engine.state.device if hasattr(engine.state, "device") else engine.device
        )
        volume = volume.as_tensor() if hasattr(volume, "as_tensor") else volume
        stage = min(int(getattr(engine.state, "stage", self.num_levels)), self.num_levels)
        gamma = float(getattr(engine.state, "gamma", self.gamma))
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        objective = functools.partial(self.losses, stage=stage, gamma=gamma)
        with autocast(volume.device, engine_precision(engine)):
            terms = engine.inferer(volume, engine.network, objective=objective)  # the trainer's train#inferer
        # SupervisedTrainer makes a GradScaler when amp is on (enabled on CUDA only): the loss is
        # scaled against fp16 gradient underflow (harmless with bf16) and steps with inf/NaN skipped
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(terms["total"]).backward()
            scaler.step(engine.optimizer)
            scaler.update()
        else:
            terms["total"].backward()
            engine.optimizer.step()
        out = {k: float(v.detach()) for k, v in terms.items()}
        out["loss"] = out["total"]
        return out
