"""The transforms the configs chain that MONAI does not have.

Intensity standardisation itself is MONAI's ScaleIntensityRanged (clip to the fingerprint's
0.5/99.5 percentiles and map linearly so that the dataset mean is 0 and its std 1, which is
nnU-Net's CTNormalization); these transforms do the slice-synthesis-specific steps.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from .degradation import covered, degrade_last
from .io import cast_to_dtype, output_dtype, upsampled_affine


def _affine(img) -> torch.Tensor:
    return img.affine.clone() if isinstance(img, MetaTensor) else torch.eye(4, dtype=torch.float64)


class SimulateThickd(MapTransform):
    """The evaluation protocol's input: thin ground truth G -> D_r(G).

    ``keys`` (1, X, Y, Z) become the thick volume (1, X, Y, ceil(Z/r)) with the slice axis'
    affine column multiplied by r; ``label_key`` receives G cropped to the covered slices
    (Z-1 rounded down to a multiple of r, plus one) as the reference.
    """

    def __init__(self, keys: KeysCollection, factor: int, profile: str = "removal", label_key: str = "label"):
        super().__init__(keys)
        self.factor, self.profile, self.label_key = factor, profile, label_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            reference = img[..., : covered(img.shape[-1], self.factor)]
            thick = degrade_last(torch.as_tensor(reference), self.factor, self.profile)
            affine = _affine(img)
            affine[:3, 2] *= self.factor
            meta = dict(img.meta) if isinstance(img, MetaTensor) else {}
            d[key] = MetaTensor(thick.clone(), affine=affine, meta=meta)
            d[self.label_key] = MetaTensor(torch.as_tensor(reference).clone(), affine=_affine(img), meta=meta)
        return d


class FinalizeSynthesisd(MapTransform):
    """Network output -> the thin-slice volume a user keeps.

    ``keys``: the prediction (1, X, Y, r*Z) in standardised units. Steps: crop to the covered
    (Z-1)*r+1 slices, map back to HU (inverse of the standardisation; clamped to the intensity
    window only with ``clip_image``, when the network saw a clipped image), cast to the output
    dtype (integers rounded), copy every known slice bit-for-bit from ``source_key`` (the input
    in HU, before standardisation), and set the output affine (slice axis column / r; same
    orientation and origin).

    Args:
        dtype: "auto" (``io.output_dtype``: int16 when the input holds integer HU, as CT does;
            float32 otherwise), or a numpy dtype name ("float32" keeps the network's values).
        clip_image: clamp the output to [clip_low, clip_high] (``intensity#clip_image``).
        nifti_order: an integer output is laid out as NIfTI stores voxels (``io.nifti_layout``),
            so that NiftiWriter writes it in one pass; a float32 output keeps the inferer's
            memory (no copy).
    """

    def __init__(
        self,
        keys: KeysCollection,
        source_key: str,
        factor: int,
        clip_low: float,
        clip_high: float,
        mean: float,
        std: float,
        dtype: str = "auto",
        clip_image: bool = False,
        nifti_order: bool = False,
    ):
        super().__init__(keys)
        self.source_key, self.factor = source_key, factor
        self.clip_low, self.clip_high, self.mean, self.std = clip_low, clip_high, mean, std
        self.dtype, self.clip_image, self.nifti_order = dtype, clip_image, nifti_order

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        source = d[self.source_key]
        z = source.shape[-1]
        length = (z - 1) * self.factor + 1
        known = (
            (source.as_tensor() if isinstance(source, MetaTensor) else torch.as_tensor(source)).detach().cpu()
        )
        dtype = output_dtype(known) if self.dtype == "auto" else np.dtype(self.dtype)
        for key in self.key_iterator(d):
            pred = d[key]
            pred = pred.as_tensor() if isinstance(pred, MetaTensor) else torch.as_tensor(pred)
            # in place on the inferer's output, which nothing reads after this (a copy only when
            # it is not float32 on the CPU): a 512x512x1197 volume is 1.2 GB per float32 copy
            pred = pred.detach()[..., :length]
            if pred.dtype != torch.float32 or pred.device.type != "cpu":
                pred = pred.float().cpu()
            hu = pred.mul_(self.std).add_(self.mean)
            if self.clip_image:  # the network only ever saw the window: keep its output inside it
                hu = hu.clamp_(self.clip_low, self.clip_high)
            # an integer output is a new tensor anyway: laid out for the writer in the same pass
            out = cast_to_dtype(hu, dtype, inplace=True, nifti_order=self.nifti_order and dtype.kind in "iu")
            del hu, pred
            out[..., :: self.factor] = known if known.dtype == out.dtype else cast_to_dtype(known, dtype)
            meta = dict(source.meta) if isinstance(source, MetaTensor) else {}
            affine = upsampled_affine(_affine(source), self.factor)
            meta.pop("affine", None)  # given below; MetaTensor warns when both carry one
            meta["spatial_shape"] = np.asarray(out.shape[1:])
            meta["original_affine"] = affine.numpy()
            d[key] = MetaTensor(out, affine=affine, meta=meta)
        return d
