"""Volumes in and out: NIfTI files and DICOM series folders through MONAI's readers.

Axis convention everywhere in this bundle: a volume is (X, Y, Z) in the file's voxel order
(no reorientation), Z is the slice axis, and a channel-first tensor is (1, X, Y, Z).

A DICOM folder may be a study export with several series; dicom_series.py says which one is
the volume, and its DicomSeriesReader (the configs' DICOM reader) reads that one.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from .dicom_series import has_dicom_marker, is_series_export

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_dicom_dir(path: str | Path) -> bool:
    """A folder read as one DICOM volume: it holds DICOM files itself (by the 'DICM' preamble
    marker), or it holds no NIfTI file and two or more of its subfolders hold DICOM files of one
    study (a study export with a folder per series). Otherwise a folder is a folder of volumes."""
    path = Path(path)
    if not path.is_dir():
        return False
    files = [f for f in sorted(path.iterdir()) if f.is_file()]
    if any(has_dicom_marker(f) for f in files):
        return True
    return not any(is_nifti(f) for f in files) and is_series_export(path)


def list_inputs(dataset_dir: str | Path) -> list[str]:
    """The volumes under ``dataset_dir``: NIfTI files and DICOM folders (``is_dicom_dir``), sorted.

    ``dataset_dir`` may itself be one NIfTI file or one DICOM folder.
    """
    root = Path(dataset_dir)
    if is_nifti(root) and root.is_file():
        return [str(root)]
    if is_dicom_dir(root):
        return [str(root)]
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such file or folder")
    found = [str(p) for p in sorted(root.iterdir()) if (p.is_file() and is_nifti(p)) or is_dicom_dir(p)]
    if not found:
        raise FileNotFoundError(f"{root}: no NIfTI files or DICOM series folders found")
    return found


def case_name(path: str | Path) -> str:
    """A file-name stem for outputs: ``scan.nii.gz`` -> ``scan``, ``series_dir/`` -> ``series_dir``."""
    name = Path(str(path).rstrip("/")).name
    for suffix in NIFTI_SUFFIXES[::-1]:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def stored_dtype(path: str | Path) -> np.dtype:
    """The dtype outputs are written in: the NIfTI's own, or int16 for DICOM (HU are integers).

    Keeping the input's dtype is what makes known slices bit-exact on disk.
    """
    if is_nifti(path):
        dtype = np.dtype(nib.load(str(path)).get_data_dtype())
        return dtype if dtype.kind in "iuf" else np.dtype(np.float32)
    return np.dtype(np.int16)


def cast_to_dtype(volume: torch.Tensor, dtype: np.dtype, inplace: bool = False) -> torch.Tensor:
    """Round and clip to an integer dtype's range, or cast to a float dtype.

    ``inplace``: round and clip ``volume`` itself (a float tensor the caller no longer needs), so
    that only the result in ``dtype`` is allocated.
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if inplace and volume.is_floating_point():
            volume = volume.round_().clamp_(info.min, info.max)
        else:
            volume = torch.round(volume).clamp(info.min, info.max)
    return volume.to(getattr(torch, dtype.name))


def upsampled_affine(affine: np.ndarray | torch.Tensor, factor: int) -> torch.Tensor:
    """The affine of the output grid: the slice axis' column divided by ``factor``.

    The origin (the first slice's centre) is unchanged because output slice 0 is input slice 0.
    """
    affine = torch.as_tensor(affine, dtype=torch.float64).clone()
    affine[:3, 2] = affine[:3, 2] / factor
    return affine


def voxel_spacing(affine: np.ndarray | torch.Tensor) -> tuple[float, float, float]:
    """Voxel sizes (mm) along X, Y, Z from an affine."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return tuple(float(v) for v in np.sqrt((a**2).sum(axis=0)))
