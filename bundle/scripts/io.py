"""Volumes in and out: NIfTI files and DICOM series folders through MONAI's readers.

Axis convention everywhere in this bundle: a volume is (X, Y, Z) in the file's voxel order
(no reorientation), Z is the slice axis, and a channel-first tensor is (1, X, Y, Z).

A DICOM folder may be a study export with several series; dicom_series.py says which one is
the volume, and its DicomSeriesReader (the configs' DICOM reader) reads that one.

Prediction reads its input once (``LoadVolumed`` takes a volume icmd_auto has already read to
check it) and writes its output in one sequential pass (``nifti_layout``, ``NiftiWriter``), with
ISA-L's gzip where python-isal is installed (docs/PERFORMANCE.md has the measurements).
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor, NibabelWriter
from monai.data.image_writer import ImageWriter
from monai.data.utils import to_affine_nd
from monai.transforms import EnsureChannelFirst, LoadImaged
from monai.utils import convert_data_type, get_equivalent_dtype

from .dicom_series import has_dicom_marker, is_series_export
from .runtime import cpu_cores

try:  # ISA-L's deflate: 3x zlib's speed at nibabel's ratio, and threads (docs/PERFORMANCE.md)
    from isal import igzip_threaded
except ImportError:  # the standard library's zlib, as nibabel writes it
    igzip_threaded = None

# gzip levels: ISA-L's 2 (of 0-3) compresses CT as tightly as zlib's 1, nibabel's default
ISAL_LEVEL, ZLIB_LEVEL = 2, 1

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
    """The dtype a volume is stored in: the NIfTI's own (before any scaling), int16 for DICOM."""
    if is_nifti(path):
        dtype = np.dtype(nib.load(str(path)).get_data_dtype())
        return dtype if dtype.kind in "iuf" else np.dtype(np.float32)
    return np.dtype(np.int16)


def output_dtype(source: torch.Tensor) -> np.dtype:
    """The dtype of a prediction from ``source``, the input as read (HU, after the file's scaling).

    int16 when every voxel is an integer in int16's range: CT's convention (DICOM stores HU so,
    and most CT NIfTI files), half the bytes of float32, and the known slices stay exact. An
    integer input outside that range keeps its own dtype; other inputs are float32 (float64 stays
    float64), which holds their known slices exactly.
    """
    if source.numel() == 0:
        return np.dtype(np.float32)
    if source.dtype in (torch.int16, torch.int8, torch.uint8, torch.bool):
        return np.dtype(np.int16)
    values = source.detach().cpu().numpy()  # a view; numpy has min/max for every integer dtype
    fits = float(values.min()) >= -32768 and float(values.max()) <= 32767
    if not source.is_floating_point():
        return np.dtype(np.int16) if fits else values.dtype
    if fits and bool(torch.all(source == torch.round(source))):
        return np.dtype(np.int16)
    return np.dtype(np.float64) if source.dtype == torch.float64 else np.dtype(np.float32)


def cast_to_dtype(
    volume: torch.Tensor, dtype: np.dtype, inplace: bool = False, nifti_order: bool = False
) -> torch.Tensor:
    """Round and clip to an integer dtype's range, or cast to a float dtype.

    ``inplace``: round and clip ``volume`` itself (a float tensor the caller no longer needs), so
    that only the result in ``dtype`` is allocated. ``nifti_order``: the result is a new tensor
    laid out as NIfTI stores voxels (``nifti_layout``).
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if inplace and volume.is_floating_point():
            volume = volume.round_().clamp_(info.min, info.max)
        else:
            volume = torch.round(volume).clamp(info.min, info.max)
    return nifti_layout(volume, dtype) if nifti_order else volume.to(getattr(torch, dtype.name))


def nifti_layout(volume: torch.Tensor, dtype: np.dtype, tile: int = 32) -> torch.Tensor:
    """``volume`` (..., X, Y, Z) cast to ``dtype`` into a new tensor laid out as NIfTI stores voxels
    (x fastest, then y, then z): the writer then writes its memory in one sequential pass.

    Float values are truncated by the cast: ``cast_to_dtype`` rounds and clips first. The copy
    goes by ``tile`` x ``tile`` blocks of (X, Z), which keeps the transposition in the caches.
    """
    *lead, x, y, z = volume.shape
    dims = len(lead)
    order = (*range(dims), dims + 2, dims + 1, dims)  # (..., Z, Y, X) in memory, seen as (..., X, Y, Z)
    out = torch.empty((*lead, z, y, x), dtype=getattr(torch, np.dtype(dtype).name)).permute(order)
    for z0 in range(0, z, tile):
        for x0 in range(0, x, tile):
            out[..., x0 : x0 + tile, :, z0 : z0 + tile].copy_(volume[..., x0 : x0 + tile, :, z0 : z0 + tile])
    return out


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


class LoadVolumed(LoadImaged):
    """MONAI's LoadImaged (image_only), which also takes a volume that was read already.

    icmd_auto reads each input once, to check it before any work, and hands that volume over
    instead of the path: decoding a 512 x 512 x 300 .nii.gz costs seconds. A value that is a
    MetaTensor (X, Y, Z), as ``LoadImage(image_only=True, dtype=None)`` returns it with one of the
    ``reader``s, gets only what follows the read (channel first, ``dtype``); a path is read as
    LoadImaged reads it (``python -m monai.bundle run`` passes paths).
    """

    takes_volumes = True  # icmd_auto's InferenceSession hands volumes only to loaders that say so

    def __init__(self, keys, reader=None, dtype=np.float32, ensure_channel_first: bool = False, **kwargs):
        super().__init__(
            keys, reader=reader, dtype=dtype, ensure_channel_first=ensure_channel_first, **kwargs
        )
        self.volume_dtype = None if dtype is None else get_equivalent_dtype(dtype, torch.Tensor)
        self.channel_first = EnsureChannelFirst() if ensure_channel_first else None

    def __call__(self, data, reader=None) -> dict:
        d = dict(data)
        if not any(isinstance(d[key], MetaTensor) for key in self.key_iterator(d)):
            return super().__call__(d, reader)
        for key in self.key_iterator(d):
            if not isinstance(d[key], MetaTensor):
                d[key] = self._loader(d[key], reader)
                continue
            volume = d[key]
            if self.volume_dtype is not None:
                volume = volume.to(self.volume_dtype)
            d[key] = self.channel_first(volume) if self.channel_first else volume
        return d


class _Sequential(io.RawIOBase):
    """A write-only stream over ``target`` that reports its position; a seek to where it stands is
    allowed (nibabel seeks to the data offset it has just reached), any other is refused."""

    def __init__(self, target):
        super().__init__()
        self.target, self.position = target, 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        position = (
            offset if whence == io.SEEK_SET else self.position + offset if whence == io.SEEK_CUR else -1
        )
        if position != self.position:
            raise io.UnsupportedOperation(f"sequential stream at {self.position}: cannot seek to {offset}")
        return self.position

    def write(self, data) -> int:
        self.target.write(data)
        size = memoryview(data).nbytes
        self.position += size
        return size


def open_gzip(path: str | Path, threads: int | None = None):
    """A gzip file to write: python-isal on ``threads`` threads (default: this process's cores)
    where it is installed, else the standard library's at nibabel's level and fixed mtime."""
    if igzip_threaded is not None:
        return igzip_threaded.open(path, "wb", compresslevel=ISAL_LEVEL, threads=threads or cpu_cores())
    return gzip.GzipFile(path, "wb", compresslevel=ZLIB_LEVEL, mtime=0)


class NiftiWriter(NibabelWriter):
    """MONAI's NibabelWriter (same file: the affine as sform and qform, code 1), which writes the
    array as it lies in memory and gzips with ``open_gzip``.

    NibabelWriter makes the array C-contiguous (a copy), passes it through a tensor and back even
    with ``resample=False`` (another) and nibabel then writes C-ordered voxels slice by slice in
    NIfTI's order (a transposition); an
    array in NIfTI's order (``nifti_layout``: FinalizeSynthesisd's integer outputs) goes to disk
    here in one sequential pass. Other layouts are written by nibabel as before.

    Args:
        threads: gzip threads (python-isal only); None = this process's cores.
    """

    def __init__(self, output_dtype=np.float32, threads: int | None = None, **kwargs):
        super().__init__(output_dtype=output_dtype, **kwargs)
        self.threads = threads

    def set_data_array(
        self, data_array, channel_dim: int | None = 0, squeeze_end_dims: bool = True, **kwargs
    ):
        one_channel = channel_dim is not None and data_array.ndim == 4 and data_array.shape[channel_dim] == 1
        if not one_channel or not squeeze_end_dims:
            return super().set_data_array(data_array, channel_dim, squeeze_end_dims, **kwargs)
        data = data_array.detach().cpu().numpy() if isinstance(data_array, torch.Tensor) else data_array
        self.data_obj = np.squeeze(np.asarray(data), axis=channel_dim)  # a view, any memory order

    def set_metadata(self, meta_dict, resample: bool = True, **options):
        if resample:
            return super().set_metadata(meta_dict, resample, **options)
        _, affine, _ = self.get_meta_info(meta_dict)
        if self.output_dtype is None:
            self.output_dtype = self.data_obj.dtype
        self.affine = affine

    def write(self, filename, verbose: bool = False, **obj_kwargs):
        ImageWriter.write(self, filename, verbose=verbose)
        data = np.asarray(self.data_obj)
        if self.output_dtype is not None:
            data = data.astype(get_equivalent_dtype(self.output_dtype, np.ndarray), copy=False)
        affine = np.eye(4) if self.affine is None else convert_data_type(self.affine, np.ndarray)[0]
        affine = to_affine_nd(r=3, affine=affine)
        image = nib.Nifti1Image(
            data, affine, header=obj_kwargs.pop("header", None), extra=obj_kwargs.pop("extra", None)
        )
        image.set_sform(image.affine, code=1)
        image.set_qform(image.affine, code=1)
        self.data_obj = image
        if str(filename).endswith(".gz"):
            with open_gzip(filename, self.threads) as stream:
                image.to_stream(_Sequential(stream))
        else:
            nib.save(image, filename)
