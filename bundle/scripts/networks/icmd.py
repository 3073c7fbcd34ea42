"""ICMDNet: the bundle's ``network_def`` — three view networks and their fusion, one state dict."""

from __future__ import annotations

import torch
from torch import nn

from .axial import AxialSliceInterpolator
from .han import HANInterpolator

VIEWS = ("a", "c", "s")
FUSIONS = {"mean3": ("a", "c", "s"), "mean_cs": ("c", "s"), "a": ("a",), "c": ("c",), "s": ("s",)}


def _chunks(n: int, size: int):
    size = n if size <= 0 else size
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


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
        plane_chunk: planes (or slice pairs) per network call at inference, 0 = all at once;
            bounds the peak memory of large windows.
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
                factor, axial_slices, mem_items=mem_items if use_memory else 0, **(axial or {})
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
        preds, auxes = [], []
        for part in _chunks(windows.shape[0], self.plane_chunk if not self.training else 0):
            pred, aux = self.axial(windows[part])
            preds.append(pred)
            auxes.append(aux)
        pred = torch.cat(preds).reshape(b, z - 1, r - 1, x, y)
        aux = {k: torch.cat([a[k] for a in auxes]) for k in auxes[0]}
        known = slices.unsqueeze(2)  # (B, Z, 1, X, Y)
        between = torch.cat([pred, slices[:, -1:].unsqueeze(2).expand(b, 1, r - 1, x, y)], dim=1)
        out = torch.cat([known, between], dim=2).reshape(b, z * r, x, y)
        return out.permute(0, 2, 3, 1).unsqueeze(1), aux

    def _planar(self, net: HANInterpolator, planes: torch.Tensor) -> torch.Tensor:
        outs = [
            net(planes[part])
            for part in _chunks(planes.shape[0], self.plane_chunk if not self.training else 0)
        ]
        return torch.cat(outs)

    def coronal_view(self, volume: torch.Tensor) -> torch.Tensor:
        """G_c on every coronal plane (X, Z), one per Y."""
        b, _, x, y, z = volume.shape
        planes = volume[:, 0].permute(0, 2, 1, 3).reshape(b * y, 1, x, z)
        out = self._planar(self.coronal, planes)
        return out.reshape(b, y, x, -1).permute(0, 2, 1, 3).unsqueeze(1)

    def sagittal_view(self, volume: torch.Tensor) -> torch.Tensor:
        """G_s on every sagittal plane (Y, Z), one per X."""
        b, _, x, y, z = volume.shape
        planes = volume[:, 0].reshape(b * x, 1, y, z)
        out = self._planar(self.sagittal or self.coronal, planes)
        return out.reshape(b, x, y, -1).unsqueeze(1)

    def view(self, name: str, volume: torch.Tensor) -> torch.Tensor:
        if name == "a":
            return self.axial_view(volume)[0]
        return self.coronal_view(volume) if name == "c" else self.sagittal_view(volume)

    def forward(self, volume: torch.Tensor, objective=None):
        """Fused synthesis; or, with ``objective``, ``objective(self, volume)`` (the training losses).

        Training computes its losses inside one ``forward`` call so that DistributedDataParallel
        sees exactly one forward per backward, however many times the views are used.
        """
        if objective is not None:
            return objective(self, volume)
        used = FUSIONS[self.fusion]
        out = None
        for name in used:  # accumulate one view at a time: one full-size buffer, not three
            v = self.view(name, volume)
            out = v if out is None else out + v
        out = out / len(used)
        out[..., :: self.factor] = volume
        return out
