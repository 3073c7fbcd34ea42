"""A synthetic CT-like phantom for the demo and the tests (not patient data).

Air around a torso whose outline changes along z, a fat layer, soft tissue, two lungs with
branching vessels, a liver and two kidneys, a spine of vertebral bodies separated by discs, and
ribs crossing the slices obliquely, plus acquisition-like noise. Anatomy is defined in mm, so
the same phantom can be sampled at any spacing; values are HU (int16).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

# Gaussian blur (the reconstruction kernel), mm
BLUR_MM = 0.6


def ct_phantom(
    shape: tuple[int, int, int] = (96, 96, 72),
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5),
    seed: int = 0,
    z_range: tuple[int, int] | None = None,
) -> np.ndarray:
    """A (X, Y, Z) int16 volume in HU.

    ``z_range`` (start, stop): only those slices of the phantom of ``shape`` (ct_phantom_large
    builds big volumes from such pieces; the blur there is exact, the noise is drawn per piece).
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    z0, z1 = z_range or (0, nz)
    local = (nx, ny, z1 - z0)
    x = (np.arange(nx) - nx / 2) * spacing[0]
    y = (np.arange(ny) - ny / 2) * spacing[1]
    z = (np.arange(z0, z1) - nz / 2) * spacing[2]
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij")
    fov = min(nx * spacing[0], ny * spacing[1]) / 2
    zn = Z / max(nz * spacing[2] / 2, 1e-6)  # -1..1 along the body axis
    vol = np.full(local, -1000.0)
    # torso: an ellipse whose size breathes along z
    ax, ay = 0.85 * fov * (1 + 0.08 * np.sin(2.1 * zn)), 0.62 * fov * (1 + 0.06 * np.cos(1.7 * zn))
    r_body = (X / ax) ** 2 + (Y / ay) ** 2
    vol[r_body < 1] = -100.0  # fat
    vol[r_body < 0.8] = 40.0  # soft tissue
    # lungs in the upper half, shrinking towards the diaphragm
    lung_scale = np.clip(1.2 - 1.4 * (zn + 0.2), 0, 1)
    for side in (-1, 1):
        r = ((X - side * 0.38 * fov) / (0.28 * fov * lung_scale + 1e-6)) ** 2 + (
            (Y + 0.05 * fov) / (0.42 * fov)
        ) ** 2
        vol[(r < 1) & (lung_scale > 0.05)] = -850.0
    # vessels: tubes winding through the lungs along z
    for k in range(10):
        cx = (rng.uniform(-0.55, 0.55) * fov) + 6 * np.sin(Z / rng.uniform(15, 40) + k)
        cy = (rng.uniform(-0.35, 0.3) * fov) + 6 * np.cos(Z / rng.uniform(15, 40) + k)
        radius = rng.uniform(1.2, 3.0)
        tube = (X - cx) ** 2 + (Y - cy) ** 2 < radius**2
        vol[tube & (vol < -500)] = 50.0
    # liver (right, lower) and kidneys (posterior, lowest)
    liver = (
        ((X + 0.35 * fov) / (0.35 * fov)) ** 2
        + ((Y - 0.1 * fov) / (0.3 * fov)) ** 2
        + ((zn + 0.5) / 0.45) ** 2
    )
    vol[liver < 1] = 60.0
    for side in (-1, 1):
        kidney = (
            ((X - side * 0.3 * fov) / (0.1 * fov)) ** 2
            + ((Y - 0.35 * fov) / (0.13 * fov)) ** 2
            + ((zn + 0.7) / 0.2) ** 2
        )
        vol[kidney < 1] = 30.0
        vol[kidney < 0.3] = 10.0
    # spine: vertebral bodies every ~25 mm with discs between, cortical rim brighter
    r_spine = (X / (0.12 * fov)) ** 2 + ((Y - 0.45 * ay) / (0.1 * fov)) ** 2
    disc = np.abs(((Z + 1000) % 25.0) - 12.5) > 10.5
    vol[(r_spine < 1) & ~disc] = 350.0
    vol[(r_spine > 0.65) & (r_spine < 1) & ~disc] = 900.0
    vol[(r_spine < 1) & disc] = 80.0
    # ribs: oblique bright bands on the body wall, crossing slices at an angle
    angle = np.arctan2(Y, X)
    wall = (r_body > 0.8) & (r_body < 0.92)
    rib_phase = (Z + 18.0 * np.cos(angle) + 1000) % 22.0
    vol[wall & (rib_phase < 5.0) & (Y < 0.35 * ay)] = 700.0
    # acquisition: a little blur (reconstruction kernel) and noise
    vol = gaussian_filter(vol, sigma=[BLUR_MM / s for s in spacing])
    noise = rng if z_range is None else np.random.default_rng([seed, z0])
    vol += noise.normal(0, 12.0, size=local)
    return np.clip(np.round(vol), -1024, 3071).astype(np.int16)


def ct_phantom_large(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int = 0, chunk: int = 32
) -> np.ndarray:
    """ct_phantom for volumes too large for its float64 grids (a 512x512x300 phantom in one piece
    peaks near 12 GB): built ``chunk`` slices at a time, each with the margin the blur reaches."""
    nz = shape[2]
    margin = int(4.0 * BLUR_MM / spacing[2] + 0.5) + 1  # scipy's gaussian_filter truncates at 4 sigma
    volume = np.empty(shape, np.int16)
    for start in range(0, nz, chunk):
        stop = min(start + chunk, nz)
        lo, hi = max(start - margin, 0), min(stop + margin, nz)
        piece = ct_phantom(shape, spacing, seed, z_range=(lo, hi))
        volume[:, :, start:stop] = piece[:, :, start - lo : stop - lo]
    return volume


def save_nifti(volume: np.ndarray, spacing: tuple[float, float, float], path: str) -> None:
    """Save with an RAS affine of the given spacing (origin at 0)."""
    affine = np.diag([*spacing, 1.0])
    img = nib.Nifti1Image(volume, affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)
