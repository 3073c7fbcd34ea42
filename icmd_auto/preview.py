"""A PNG to judge a prediction at a glance: coronal and sagittal planes, before and after.

Left half: the thick input, nearest-upsampled along z to the output grid (each input slice
repeated, so its steps show); right half: the prediction. Each half holds the middle coronal
plane and the middle sagittal plane, z vertical with the superior end up, pixels square in mm
(the in-plane spacing), in one CT window. Every r-th row of the two halves is the same input
slice, so the rows in between show what the synthesis added.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw

from .fingerprint import load_case_array
from .template import scripts

# W 1500 / L -300 HU: lung, soft tissue and bone all keep some contrast (a soft-tissue window,
# W 400 / L 40, would show the lungs black and bone white, hiding most of the interpolation)
WINDOW_LEVEL_HU = -300.0
WINDOW_WIDTH_HU = 1500.0
BAND = 16  # pixel rows for the labels above the planes
GAP = 4  # black columns after each plane


def _gray(plane_hu: np.ndarray) -> np.ndarray:
    low = WINDOW_LEVEL_HU - WINDOW_WIDTH_HU / 2
    scaled = (plane_hu.astype(np.float32) - low) / WINDOW_WIDTH_HU
    return np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def _panel(plane: np.ndarray, width: int, height: int, superior_up: bool) -> Image.Image:
    """``plane`` (in-plane axis, Z) -> an image ``width`` x ``height`` with z vertical."""
    rows = plane.T[::-1] if superior_up else plane.T  # row 0 is the top of the picture
    return Image.fromarray(_gray(rows)).resize((width, height), Image.Resampling.BILINEAR)


def preview_image(source: np.ndarray, prediction: np.ndarray, affine: np.ndarray, factor: int) -> Image.Image:
    """The preview of ``prediction`` (X, Y, (Z-1)*r+1) synthesised from ``source`` (X, Y, Z), in HU.

    ``affine`` is the prediction's (its z column is the output slice step).
    """
    x, y, z_out = prediction.shape
    sx, sy, sz = scripts.io.voxel_spacing(affine)
    pixel = min(sx, sy)
    width_c, width_s = round(x * sx / pixel), round(y * sy / pixel)
    height = max(round(z_out * sz / pixel), 1)
    superior_up = float(np.asarray(affine)[2, 2]) > 0  # slice index grows towards the head
    nearest = np.minimum((np.arange(z_out) + factor // 2) // factor, source.shape[2] - 1)
    half = width_c + width_s + 2 * GAP
    canvas = Image.new("L", (2 * half, BAND + height), 0)
    for offset, volume, z_index in ((0, source, nearest), (half, prediction, slice(None))):
        coronal = np.asarray(volume[:, y // 2, :])[:, z_index]
        sagittal = np.asarray(volume[x // 2, :, :])[:, z_index]
        canvas.paste(_panel(coronal, width_c, height, superior_up), (offset, BAND))
        canvas.paste(_panel(sagittal, width_s, height, superior_up), (offset + width_c + GAP, BAND))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 2), f"input, nearest x{factor} (coronal | sagittal)", fill=255)
    draw.text((half + 2, 2), f"ICMD x{factor}   W {WINDOW_WIDTH_HU:g} / L {WINDOW_LEVEL_HU:g} HU", fill=255)
    return canvas


def write_preview(
    source_path: Path, prediction_path: Path, factor: int, path: Path, series: Sequence[str] = ()
) -> Path:
    """Write the preview of the NIfTI ``prediction_path`` made from ``source_path`` to ``path`` (.png).

    ``series``: the SeriesInstanceUIDs named where a DICOM ``source_path`` holds several series.
    Written under a temporary name beside ``path`` and renamed into place.
    """
    # the axes the bundle saw, as the prediction has them
    source, _, _ = load_case_array(source_path, series)
    if source.ndim == 4:
        source = source[..., 0]
    image = nib.load(str(prediction_path))
    canvas = preview_image(source, image.dataobj, image.affine, factor)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        canvas.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
