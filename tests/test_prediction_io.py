"""Prediction I/O: the input decoded once, the output dtype, the NIfTI writer.

No real CT needed: the phantom bundle (conftest.phantom_work) and small made volumes.
"""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import PHANTOM_SHAPE, run_bundle
from monai.data import MetaTensor, NibabelReader, NibabelWriter
from monai.transforms import LoadImage, LoadImaged, SaveImage

from icmd_auto import api
from icmd_auto.template import scripts

FACTOR = 3  # phantom_work's


@pytest.fixture(scope="module")
def phantom(phantom_work):
    return phantom_work.parent / "phantom.nii.gz"


def _saved(volume: np.ndarray, like, path, slope: float = 1.0, inter: float = 0.0):
    """``volume`` saved with ``like``'s affine (and the given scaling)."""
    img = nib.Nifti1Image(volume, like.affine)
    img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    return path


def _thin_grid(thick_affine: np.ndarray) -> np.ndarray:
    expected = thick_affine.copy()
    expected[:3, 2] /= FACTOR
    return expected


def test_integer_hu_is_written_as_int16_with_exact_known_slices(phantom_work, phantom, tmp_path):
    thick = nib.load(str(phantom))
    hu = np.asanyarray(thick.dataobj).astype(np.int32)
    inputs = {  # how CT HU arrive: int16, int32 (as the shared abdomen), float32 holding integers
        "int16": phantom,
        "int32": _saved(hu, thick, tmp_path / "int32.nii.gz"),
        "float32": _saved(hu.astype(np.float32), thick, tmp_path / "float32.nii.gz"),
        "scaled int16": _saved((hu + 1024).astype(np.int16), thick, tmp_path / "scaled.nii.gz", inter=-1024),
    }
    outputs = {}
    for name, path in inputs.items():
        out = api.predict(phantom_work, path, tmp_path / f"thin_{name.replace(' ', '_')}.nii.gz", quiet=True)
        thin = nib.load(str(out))
        assert thin.get_data_dtype() == np.int16, name
        assert np.array_equal(thin.affine, _thin_grid(thick.affine)), name
        assert thin.shape == (*PHANTOM_SHAPE[:2], (PHANTOM_SHAPE[2] - 1) * FACTOR + 1)
        voxels = np.asanyarray(thin.dataobj)
        assert np.array_equal(voxels[..., ::FACTOR], hu), f"{name}: known slices bit-exact"
        outputs[name] = voxels
    for name in ("int32", "float32"):  # the same HU in, the same voxels out
        assert np.array_equal(outputs[name], outputs["int16"]), name
    # nibabel scales to float64, whose standardisation may round differently in float32
    assert np.abs(outputs["scaled int16"].astype(int) - outputs["int16"]).max() <= 1


def test_fractional_input_stays_float_and_float32_is_an_option(phantom_work, phantom, tmp_path):
    thick = nib.load(str(phantom))
    hu = np.asanyarray(thick.dataobj).astype(np.float32) + 0.25
    fractional = _saved(hu, thick, tmp_path / "fractional.nii.gz")
    out = api.predict(phantom_work, fractional, tmp_path / "thin_fractional.nii.gz", quiet=True)
    thin = nib.load(str(out))
    assert thin.get_data_dtype() == np.float32
    assert np.array_equal(np.asanyarray(thin.dataobj)[..., ::FACTOR], hu), "known slices bit-exact"
    assert np.array_equal(thin.affine, _thin_grid(thick.affine))
    asked = api.predict(
        phantom_work, phantom, tmp_path / "thin_float32.nii.gz", quiet=True, output_dtype="float32"
    )
    as_float, as_int = (
        nib.load(str(asked)),
        nib.load(str(api.predict(phantom_work, phantom, tmp_path / "i.nii.gz"))),
    )
    assert as_float.get_data_dtype() == np.float32
    float_voxels = np.asanyarray(as_float.dataobj)
    assert np.array_equal(np.round(float_voxels), np.asanyarray(as_int.dataobj)), "int16 is float32 rounded"
    assert not np.array_equal(float_voxels, np.round(float_voxels)), "synthesized voxels are not rounded"


@pytest.mark.parametrize(
    "values, dtype, expected",
    [
        ([-1024, 3071], torch.int16, np.int16),
        ([-1024, 3071], torch.int32, np.int16),
        ([0, 40000], torch.int32, np.int32),  # outside int16: its own dtype keeps the known slices
        ([0, 65535], torch.uint16, np.uint16),
        ([-1024.0, 3071.0], torch.float32, np.int16),
        ([-1024.0, 3071.5], torch.float32, np.float32),
        ([0.0, 40000.0], torch.float32, np.float32),
        ([-1024.0, 0.125], torch.float64, np.float64),
    ],
)
def test_output_dtype_rule(values, dtype, expected):
    assert scripts.io.output_dtype(torch.tensor(values).to(dtype)) == np.dtype(expected)


def _count_reads(monkeypatch) -> list:
    reads = []
    read = NibabelReader.read

    def counted(self, data, **kwargs):
        reads.append(data)
        return read(self, data, **kwargs)

    monkeypatch.setattr(NibabelReader, "read", counted)
    return reads


def test_predict_decodes_its_input_once(phantom_work, phantom, tmp_path, monkeypatch):
    reads = _count_reads(monkeypatch)
    api.predict(phantom_work, phantom, tmp_path / "thin.nii.gz", quiet=True)
    assert len(reads) == 1, "the input check's read is the bundle's"
    reads.clear()
    zero_shot = api.predict(None, phantom, tmp_path / "zero_shot.nii.gz", quiet=True, factor=FACTOR)
    assert len(reads) == 1, "zero-shot: one read for the check, the plan and the prediction"
    assert nib.load(str(zero_shot)).get_data_dtype() == np.int16


def test_loader_takes_a_volume_read_already_as_it_reads_the_path(phantom):
    loader = scripts.io.LoadVolumed(
        keys="image", reader="NibabelReader", ensure_channel_first=True, dtype=None
    )
    from_path = loader({"image": str(phantom)})["image"]
    volume = LoadImage(image_only=True, dtype=None)(str(phantom), reader=NibabelReader())
    handed = loader({"image": volume})["image"]
    monai = LoadImaged(keys="image", reader="NibabelReader", ensure_channel_first=True, dtype=None)
    reference = monai({"image": str(phantom)})["image"]
    for image in (from_path, handed):
        assert image.shape == reference.shape == (1, *PHANTOM_SHAPE) and image.dtype == reference.dtype
        assert torch.equal(image.as_tensor(), reference.as_tensor())
        assert torch.equal(image.affine, reference.affine)
        assert image.meta["filename_or_obj"] == reference.meta["filename_or_obj"]


def test_bundle_alone_reads_paths_and_writes_what_predict_writes(phantom_work, phantom, tmp_path):
    ours = api.predict(phantom_work, phantom, tmp_path / "ours.nii.gz", quiet=True)
    alone = tmp_path / "alone"
    result = run_bundle(
        phantom_work / "bundle", ["inference.json"], {"dataset_dir": str(phantom), "output_dir": str(alone)}
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    written = nib.load(str(alone / "phantom_icmd.nii.gz"))
    assert written.get_data_dtype() == np.int16
    assert np.array_equal(written.affine, nib.load(str(ours)).affine)
    assert np.array_equal(np.asanyarray(written.dataobj), np.asanyarray(nib.load(str(ours)).dataobj))


@pytest.mark.parametrize("isal", [True, False], ids=["isal", "zlib"])
@pytest.mark.parametrize("layout", ["nifti", "torch"])
def test_nifti_writer_writes_what_monai_writes(tmp_path, monkeypatch, isal, layout):
    if not isal:  # where python-isal is not installed: the standard library's gzip
        monkeypatch.setattr(scripts.io, "igzip_threaded", None)
    elif scripts.io.igzip_threaded is None:
        pytest.skip("python-isal is not installed")
    affine = torch.tensor(
        [[-0.7, 0, 0, 90], [0, -0.7, 0, 80], [0, 0, 0.7, -30], [0, 0, 0, 1]], dtype=torch.float64
    )
    values = torch.randint(-1024, 3071, (1, 37, 29, 19), generator=torch.Generator().manual_seed(0))
    volume = values.to(torch.int16)
    if layout == "nifti":
        volume = scripts.io.cast_to_dtype(values.float(), np.int16, nifti_order=True)
        assert volume.permute(0, 3, 2, 1).is_contiguous(), "x fastest, as NIfTI stores voxels"
    image = MetaTensor(volume, affine=affine, meta={"filename_or_obj": "case.nii.gz"})
    for writer, folder in ((scripts.io.NiftiWriter, "ours"), (NibabelWriter, "monai")):
        SaveImage(
            output_dir=tmp_path / folder,
            output_postfix="",
            output_dtype=None,
            resample=False,
            separate_folder=False,
            print_log=False,
            writer=writer,
        )(image)
    ours, monai = (
        nib.load(str(tmp_path / "ours" / "case.nii.gz")),
        nib.load(str(tmp_path / "monai" / "case.nii.gz")),
    )
    with (
        gzip.open(tmp_path / "ours" / "case.nii.gz") as a,
        gzip.open(tmp_path / "monai" / "case.nii.gz") as b,
    ):
        assert a.read() == b.read(), "the same NIfTI bytes, header included"
    assert ours.get_data_dtype() == np.int16 and np.array_equal(ours.affine, monai.affine)
    assert np.array_equal(np.asanyarray(ours.dataobj), values[0].numpy())
