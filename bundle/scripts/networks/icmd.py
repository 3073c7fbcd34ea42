"""ICMDNet: the bundle's ``network_def`` — three view networks and their fusion, one state dict."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from .axial import AxialSliceInterpolator
from .han import HANInterpolator

VIEWS = ("a", "c", "s")
FUSIONS = {"mean3": ("a", "c", "s"), "mean_cs": ("c", "s"), "a": ("a",), "c": ("c",), "s": ("s",)}


class _SlicesOnly(nn.Module):
    """G_a's synthesized slices alone (its forward also returns the bottleneck features); made on
    demand, so it adds nothing to ICMDNet's state dict."""

    def __init__(self, axial: nn.Module):
        super().__init__()
        self.axial = axial

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        return self.axial(slices)[0]


class ICMDNet(nn.Module):
    """Slice synthesis from three views.

    ``forward``: (B, 1, X, Y, Z) standardised thick volume -> (B, 1, X, Y, r*Z). Output ``r*k``
    is input slice ``k`` (copied unchanged); the slices between are the fusion of the views;
    the last ``r-1`` outputs lie past the last input slice (they repeat it) and are trimmed by
    the caller once, on the whole volume, to ``(Z-1)*r+1``. Returning exactly r x the input's
    slice count keeps MONAI's sliding-window output mapping exact.

    The views:
        a: G_a interpolates the r-1 slices between neighbouring axial slices (2 or 4 inputs);
        c: G_c upsamples every coronal plane (X, Z) along Z;
        s: G_s upsamples every sagittal plane (Y, Z) along Z (G_s is G_c when ``share_cs``).

    Args:
        factor: r.
        views: the view networks to build (the fusion must only use built ones).
        fusion: "mean3" | "mean_cs" | "a" | "c" | "s", how synthesized slices are combined.
        axial: G_a hyper-parameters (width, groups, blocks); ``mem_items`` 0 = no memory bank.
        planar: G_c / G_s hyper-parameters (width, groups, blocks).
        share_cs: one network for the coronal and sagittal views.
        axial_slices: known slices G_a sees, 2 or 4.
        plane_chunk: planes (or slice pairs) per network call in ``forward`` without an
            objective (inference), 0 = all at once; bounds the peak memory (``synthesize``).
        input_window: (low, high) in standardised units: the view networks' feature branches
            see intensities clamped to it (nnU-Net's CT window); their linear base does not.
    """

    def __init__(
        self,
        factor: int,
        views: tuple[str, ...] | list[str] = VIEWS,
        fusion: str = "mean3",
        axial: dict | None = None,
        planar: dict | None = None,
        share_cs: bool = True,
        use_memory: bool = True,
        mem_items: int = 10,
        axial_slices: int = 2,
        plane_chunk: int = 0,
        input_window: tuple[float, float] | list[float] | None = None,
    ):
        super().__init__()
        if factor < 2:
            raise ValueError(f"factor must be >= 2, got {factor}")
        views = tuple(views)
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {sorted(FUSIONS)}, got {fusion!r}")
        missing = set(FUSIONS[fusion]) - set(views)
        if missing:
            raise ValueError(
                f"fusion {fusion!r} needs views {sorted(missing)} that are not built (views={views})"
            )
        self.factor, self.views, self.fusion, self.plane_chunk = factor, views, fusion, plane_chunk
        self.axial = (
            AxialSliceInterpolator(
                factor,
                axial_slices,
                mem_items=mem_items if use_memory else 0,
                input_window=input_window,
                **(axial or {}),
            )
            if "a" in views
            else None
        )
        self.coronal = (
            HANInterpolator(factor, input_window=input_window, **(planar or {}))
            if ("c" in views or "s" in views)
            else None
        )
        self.sagittal = None
        if "s" in views and not share_cs:
            self.sagittal = HANInterpolator(factor, input_window=input_window, **(planar or {}))

    @classmethod
    def from_config(cls, icmd: dict, architecture: dict, **kwargs) -> ICMDNet:
        """The network of a bundle's ``icmd`` and ``architecture`` config sections (as ``network_def``
        builds it): ``icmd`` keys that are arguments of this class are passed (``factor``, ``views``,
        ``fusion``, ``share_cs``, ...; others such as loss weights are ignored), absent ones keep the
        defaults above; ``architecture`` gives the ``axial`` and ``planar`` hyper-parameters;
        ``kwargs`` (``input_window``, ``plane_chunk``) are passed as they are. The one place outside
        the configs that turns a method into a network (the planner and pretraining use it)."""
        names = inspect.signature(cls.__init__).parameters
        given = {k: v for k, v in icmd.items() if k in names and k not in ("self", "axial", "planar")}
        return cls(axial=architecture.get("axial"), planar=architecture.get("planar"), **given, **kwargs)

    def load_prior(self, state: dict) -> list[str]:
        """Start from a prior's weights (a warm start): the view networks ``state`` holds load from
        it, those it lacks keep their initialisation. A prior of the in-plane recipe holds G_c
        (``coronal.*``), which also starts a separate G_s (the prior's G_c is its G_s); the ICMD
        recipe's G_a then starts fresh. A tensor of ``state`` that this network lacks, or a view
        network it holds only part of, is an error. Returns the view networks that start fresh."""
        state = dict(state)
        held = {key.split(".")[0] for key in state}
        if self.sagittal is not None and "coronal" in held and "sagittal" not in held:
            state.update(
                {"sagittal" + k[len("coronal") :]: v for k, v in state.items() if k.startswith("coronal.")}
            )
            held.add("sagittal")
        missing, unexpected = self.load_state_dict(state, strict=False)
        partial = sorted({key.split(".")[0] for key in missing} & held)
        problems = [f"{len(unexpected)} weights it lacks (e.g. {unexpected[0]})"] if unexpected else []
        problems += [f"the prior holds {', '.join(partial)} only in part"] if partial else []
        if problems:
            raise ValueError(f"the prior does not fit this network: {'; '.join(problems)}")
        return sorted({key.split(".")[0] for key in missing})

    # --- the three views, each (B, 1, X, Y, Z) -> (B, 1, X, Y, r*Z) -------------------------

    def axial_view(self, volume: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """G_a between every pair of neighbouring slices; also returns G_a's aux (E_3, p)."""
        if self.axial is None:
            raise RuntimeError("this ICMDNet has no axial network (views without 'a')")
        b, _, x, y, z = volume.shape
        r = self.factor
        if z < 2:
            raise ValueError(f"need at least 2 slices, got {z}")
        slices = volume[:, 0].permute(0, 3, 1, 2)  # (B, Z, X, Y)
        if self.axial.in_slices == 4:
            padded = torch.cat([slices[:, :1], slices, slices[:, -1:]], dim=1)
            windows = torch.stack([padded[:, k : k + 4] for k in range(z - 1)], dim=1)  # (B, Z-1, 4, X, Y)
        else:
            windows = torch.stack([slices[:, :-1], slices[:, 1:]], dim=2)  # (B, Z-1, 2, X, Y)
        windows = windows.reshape(b * (z - 1), -1, x, y)
        pred, aux = self.axial(windows)
        pred = pred.reshape(b, z - 1, r - 1, x, y)
        known = slices.unsqueeze(2)  # (B, Z, 1, X, Y)
        between = torch.cat([pred, slices[:, -1:].unsqueeze(2).expand(b, 1, r - 1, x, y)], dim=1)
        out = torch.cat([known, between], dim=2).reshape(b, z * r, x, y)
        return out.permute(0, 2, 3, 1).unsqueeze(1), aux

    def coronal_view(self, volume: torch.Tensor) -> torch.Tensor:
        """G_c on every coronal plane (X, Z), one per Y."""
        b, _, x, y, z = volume.shape
        planes = volume[:, 0].permute(0, 2, 1, 3).reshape(b * y, 1, x, z)
        out = self.coronal(planes)
        return out.reshape(b, y, x, -1).permute(0, 2, 1, 3).unsqueeze(1)

    def sagittal_view(self, volume: torch.Tensor) -> torch.Tensor:
        """G_s on every sagittal plane (Y, Z), one per X."""
        b, _, x, y, z = volume.shape
        planes = volume[:, 0].reshape(b * x, 1, y, z)
        out = self.view_network("s")(planes)
        return out.reshape(b, x, y, -1).unsqueeze(1)

    def view(self, name: str, volume: torch.Tensor) -> torch.Tensor:
        if name == "a":
            return self.axial_view(volume)[0]
        return self.coronal_view(volume) if name == "c" else self.sagittal_view(volume)

    # --- inference: whole planes, chunk by chunk, accumulated in place ------------------------

    @property
    def fusion_views(self) -> tuple[str, ...]:
        """The views the fusion averages."""
        return FUSIONS[self.fusion]

    def plane_counts(self, shape: tuple[int, ...] | torch.Size) -> dict[str, int]:
        """Network calls' units per view of a (B, 1, X, Y, Z) volume: coronal planes (B*Y),
        sagittal planes (B*X), axial slice pairs (B*(Z-1))."""
        b, _, x, y, z = shape
        return {"a": b * (z - 1), "c": b * y, "s": b * x}

    def _view_input(self, name: str, volume: torch.Tensor, b: int, part: slice) -> torch.Tensor:
        """The network input for planes ``part`` of batch item ``b``: (n, 1, H, Z) or (n, K, X, Y)."""
        if name == "c":  # coronal planes (X, Z), one per Y
            return volume[b, 0, :, part].permute(1, 0, 2).unsqueeze(1)
        if name == "s":  # sagittal planes (Y, Z), one per X
            return volume[b, 0, part].unsqueeze(1)
        z = volume.shape[-1]
        slices = volume[b, 0].permute(2, 0, 1)  # (Z, X, Y)
        if self.axial.in_slices == 4:  # pair k sees slices k-1, k, k+1, k+2 (clamped at the ends)
            index = torch.arange(part.start, part.stop).unsqueeze(1) + torch.arange(-1, 3)
            return slices[index.clamp_(0, z - 1)]
        return torch.stack([slices[part], slices[part.start + 1 : part.stop + 1]], dim=1)

    def _add_view_output(self, name: str, out: torch.Tensor, b: int, part: slice, pred: torch.Tensor) -> None:
        """out[b] += the view network's output for planes ``part`` (in out's dtype and device)."""
        if name == "c":
            out[b, 0, :, part] += pred[:, 0].permute(1, 0, 2)
        elif name == "s":
            out[b, 0, part] += pred[:, 0]
        else:  # pred (n, r-1, X, Y): the slices between known slices k and k+1
            r = self.factor
            target = out[b, 0, :, :, part.start * r : part.stop * r].unflatten(-1, (-1, r))
            target[..., 1:] += pred.permute(2, 3, 0, 1)

    def view_network(self, name: str) -> nn.Module:
        """The network that synthesises view ``name`` from the planes ``_view_input`` gives."""
        if name == "a":
            return _SlicesOnly(self.axial)
        return self.sagittal if (name == "s" and self.sagittal is not None) else self.coronal

    def synthesize(
        self,
        volume: torch.Tensor,
        plane_chunk: int = 0,
        device: torch.device | str | None = None,
        prepare=None,
        on_chunk=None,
        out: torch.Tensor | None = None,
        calls=None,
    ) -> torch.Tensor:
        """The fused synthesis, each view on whole planes, ``plane_chunk`` planes per network call.

        (B, 1, X, Y, Z) -> (B, 1, X, Y, r*Z) float32 on ``volume``'s device, the same as
        ``forward`` but with memory bounded by the chunk: each chunk of planes is moved to
        ``device`` (default: the network's), passed through ``prepare`` (e.g. a memory-format
        change), synthesised, and added into the output in place. ``on_chunk(n)`` is called after
        each chunk of n planes (a progress bar). ``out``: the (B, 1, X, Y, r*Z) float32 buffer to
        fill (zeroed here), e.g. one made outside ``torch.inference_mode`` so that later steps may
        modify it in place. Known slices are copied; the last r-1 outputs (past the last
        input slice) hold the c/s networks' extrapolation and G_a's repetition of the last slice.
        ``calls``: where given (inferers.PlaneCallTuner), it decides each call instead of
        ``plane_chunk`` and ``prepare``: ``calls.size(network, plane_shape, left, total)`` gives the
        planes of the next call and ``calls(network, planes)`` runs it.

        Every network call holds exactly the planes it was given in a fresh buffer (the last call
        is padded with zero planes): convolution libraries pick their algorithm by the batch size,
        so the same ``plane_chunk`` gives bit-identical output under any memory budget. Each plane's
        statistics (channel and layer attention) span that whole plane, so regrouping planes
        changes a plane's output only by float rounding.
        """
        b, _, x, y, z = volume.shape
        r = self.factor
        if device is None:
            device = next(self.parameters()).device
        used = self.fusion_views
        counts = self.plane_counts((1, 1, x, y, z))
        if out is None:
            out = torch.zeros((b, 1, x, y, z * r), dtype=torch.float32, device=volume.device)
        else:
            out.zero_()
        for name in used:
            network = self.view_network(name)
            total = counts[name]
            plane_shape = tuple(self._view_input(name, volume, 0, slice(0, 1)).shape[1:])
            for item in range(b):
                start = 0
                while start < total:
                    if calls is not None:
                        size = calls.size(network, plane_shape, total - start, total)
                    else:
                        size = plane_chunk if plane_chunk > 0 else total
                    part = slice(start, min(start + size, total))
                    planes = self._view_input(name, volume, item, part).to(device, torch.float32)
                    n = planes.shape[0]
                    # every call: exactly `size` planes, in a fresh contiguous buffer (see above)
                    planes = F.pad(planes, (0, 0, 0, 0, 0, 0, 0, max(size - n, 0)))
                    if calls is not None:
                        pred = calls(network, planes)[:n]
                    else:
                        pred = network(prepare(planes) if prepare is not None else planes)[:n]
                    self._add_view_output(name, out, item, part, pred.to(out.device, torch.float32))
                    if on_chunk is not None:
                        on_chunk(n)
                    start = part.stop
            if name == "a":  # past the last known slice G_a repeats it (trimmed by the caller)
                out[..., (z - 1) * r + 1 :] += volume[..., -1:].to(torch.float32)
        out /= len(used)
        out[..., ::r] = volume
        return out

    def forward(self, volume: torch.Tensor, objective=None):
        """Fused synthesis; or, with ``objective``, ``objective(self, volume)`` (the training losses).

        Training computes its losses inside one ``forward`` call so that DistributedDataParallel
        sees exactly one forward per backward, however many times the views are used.
        """
        if objective is not None:
            return objective(self, volume)
        if torch.jit.is_tracing():  # whole views in one batched call each: a graph valid for any Z
            out = None
            for name in self.fusion_views:
                v = self.view(name, volume)
                out = v if out is None else out + v
            out = out / len(self.fusion_views)
            out[..., :: self.factor] = volume
            return out
        return self.synthesize(volume, self.plane_chunk)
