"""Share and deploy: export a model-zoo archive, run it where icmd_auto is absent, import it back."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import socket
import stat
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import (
    CHEST,
    PHANTOM_SHAPE,
    PHANTOM_SPACING,
    REPO,
    perturbed,
    requires_shared_data,
    run_bundle,
    run_cli,
    write_dataset,
)
from monai.bundle import verify_net_in_out

from icmd_auto import api, runner
from icmd_auto.errors import ICMDError
from icmd_auto.export import SCHEMA, SCHEMA_MD5, TRACE_XY, verify_metadata
from icmd_auto.prior import available
from icmd_auto.synthetic import ct_phantom, save_nifti

MAX_HU_DIFF = 1e-4


@pytest.fixture(scope="module")
def archive(tiny_work, tmp_path_factory):
    """The tiny chest bundle exported with a TorchScript model (no evaluation report in its work folder)."""
    out = tmp_path_factory.mktemp("export") / "icmd_chest_x3.zip"
    result = run_cli("export", "--work", str(tiny_work), "--out", str(out), "--torchscript")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no evaluation report found" in result.stdout
    return out


@pytest.fixture(scope="module")
def unzipped(archive, tmp_path_factory):
    """The archive unpacked on 'another machine': a folder that knows nothing of the work folder."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(elsewhere)
    return elsewhere / "icmd_chest_x3"


@pytest.fixture(scope="module")
def bundle_alone_output(unzipped, chest_x3, tmp_path_factory):
    """inference.json run by MONAI alone (icmd_auto unimportable) on the thick chest, float32 HU."""
    out = tmp_path_factory.mktemp("alone")
    result = run_bundle(
        unzipped,
        ["inference.json"],
        {"dataset_dir": str(chest_x3), "output_dir": str(out), "output_dtype": "float32"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out / "chest_x3_icmd.nii.gz"


def voxels(path):
    return np.asanyarray(nib.load(str(path)).dataobj).astype(np.float64)


@requires_shared_data
def test_archive_holds_a_model_zoo_bundle_without_local_paths(archive, unzipped, chest_x3):
    names = zipfile.ZipFile(archive).namelist()
    assert all(n.startswith("icmd_chest_x3/") for n in names), "one folder named after the archive"
    files = {p.relative_to(unzipped).as_posix() for p in unzipped.rglob("*") if p.is_file()}
    for required in (
        "configs/train.json",
        "configs/inference.json",
        "configs/evaluate.json",
        "configs/multi_gpu_train.json",
        "configs/metadata.json",
        "configs/logging.conf",
        "scripts/networks/icmd.py",
        "models/model.pt",
        "models/model.ts",
        "docs/README.md",
        "LICENSE",
    ):
        assert required in files, required
    assert not [
        f for f in files if f.startswith(("logs/", "eval/")) or "checkpoint_" in f or "__pycache__" in f
    ]
    configs = "".join((unzipped / "configs" / name).read_text() for name in ("train.json", "inference.json"))
    assert str(chest_x3) not in configs and str(chest_x3.parent) not in configs, "no local paths travel"
    train = json.loads((unzipped / "configs" / "train.json").read_text())
    assert train["datalist"] == {"_target_": "scripts.io.list_inputs", "dataset_dir": "@dataset_dir"}
    meta = json.loads((unzipped / "configs" / "metadata.json").read_text())
    assert meta["version"] == "0.2.0" and {"0.1.0", "0.2.0"} <= set(meta["changelog"])
    assert "eval_metrics" not in meta, "no report, no numbers"
    assert meta["network_data_format"]["outputs"]["pred"]["spatial_shape"] == ["8*n", "8*n", "2*n*3"]
    verify_net_in_out(  # the declared input runs through the network (channels, dtype)
        net_id="network_def",
        meta_file=str(unzipped / "configs" / "metadata.json"),
        config_file=str(unzipped / "configs" / "inference.json"),
        n=2,
        any=2,
        **runner.private_targets(unzipped, ["inference.json"]),
    )
    card = (unzipped / "docs" / "README.md").read_text()
    for section in ("## This model", "## Measured results", "## Training", "## Inference", "## Intended use"):
        assert section in card, section
    assert "No evaluation report was found" in card
    assert "| starting weights | random (from scratch) |" in card and "## Starting weights" not in card
    assert "python -m monai.bundle run --bundle_root . --config_file configs/train.json" in card


@requires_shared_data
def test_bundle_alone_gives_what_icmd_auto_predict_gives(tiny_work, chest_x3, bundle_alone_output, tmp_path):
    predicted = api.predict(tiny_work, chest_x3, tmp_path / "pred.nii.gz", quiet=True, output_dtype="float32")
    alone, ours = nib.load(str(bundle_alone_output)), nib.load(str(predicted))
    assert alone.shape == ours.shape == (122, 102, 37 * 3 + 1)
    assert np.array_equal(alone.affine, ours.affine)
    assert np.abs(voxels(bundle_alone_output) - voxels(predicted)).max() < MAX_HU_DIFF


@requires_shared_data
def test_torchscript_model_gives_the_state_dict_models_output(
    unzipped, chest_x3, bundle_alone_output, tmp_path
):
    extra = {"metadata.json": "", "inference.json": ""}
    torch.jit.load(str(unzipped / "models" / "model.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["name"].startswith("ICMD CT slice synthesis x3")
    # the bundle's own inference, with the TorchScript model in place of the network and its weights
    result = run_bundle(
        unzipped,
        ["inference.json"],
        {
            "dataset_dir": str(chest_x3),
            "output_dir": str(tmp_path),
            "output_dtype": "float32",
            "network": "$torch.jit.load(@bundle_root + '/models/model.ts', map_location=@device)",
            "load_pretrain": "False",  # a Python literal for monai.bundle's fire parser
        },
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    traced = tmp_path / "chest_x3_icmd.nii.gz"
    # the traced graph holds one in-plane size (128 x 128): the bundle runs it in sliding windows of that
    # size, whose attention statistics pool over windows instead of whole planes, so the voxels are close
    # to the plane-wise output of the state-dict model, not equal (the export itself checks the traced
    # graph against the network on the traced size to 1e-4)
    diff = np.abs(voxels(traced) - voxels(bundle_alone_output))
    assert voxels(traced).shape == voxels(bundle_alone_output).shape
    assert np.array_equal(voxels(traced)[..., ::3], voxels(bundle_alone_output)[..., ::3]), (
        "known slices exact"
    )
    assert diff.mean() < 3.0 and diff.max() < 50, (diff.mean(), diff.max())  # measured: 1.05, 13.4 HU


def _bundle_network(bundle, weights: bool = True) -> torch.nn.Module:
    """inference.json's network_def of ``bundle``, with models/model.pt loaded (or fresh: linear)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle), **runner.private_targets(bundle, ["inference.json"])})
    net = parser.get_parsed_content("network_def")
    if weights:
        net.load_state_dict(torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True))
    return net.eval()


def test_torchscript_model_is_the_trained_network(phantom_work, tmp_path):
    """models/model.ts of a trained-like (perturbed) model gives the work folder's network output to
    1e-4 standardised units (0.05 HU) on a volume it was not traced on, while that output is far
    from linear interpolation: a model.ts of other weights, or of a graph that differs, fails."""
    work = tmp_path / "work"
    shutil.copytree(phantom_work, work)
    model = work / "bundle" / "models" / "model.pt"
    torch.save(perturbed(torch.load(model, weights_only=True)), model)
    api.export(work, tmp_path / "perturbed.zip", torchscript=True)
    with zipfile.ZipFile(tmp_path / "perturbed.zip") as zf:
        traced = torch.jit.load(io.BytesIO(zf.read("perturbed/models/model.ts")), map_location="cpu").eval()
    net, linear = _bundle_network(work / "bundle"), _bundle_network(work / "bundle", weights=False)
    volume = torch.randn(1, 1, TRACE_XY, TRACE_XY, 9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = net(volume)
        assert (expected - linear(volume)).abs().mean() > 0.01, "the model is not linear interpolation"
        assert (traced(volume) - expected).abs().max() < 1e-4


@requires_shared_data
def test_measured_results_travel_with_the_bundle(tiny_work, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(tiny_work, work)
    dataset = write_dataset(tmp_path / "dataset.json", [CHEST], test=[CHEST])
    report = api.evaluate(work, dataset, quiet=True)  # writes work/evaluation.json
    summary = api.export(work, tmp_path / "chest.zip")
    assert summary["report"] == str(work / "evaluation.json")
    with zipfile.ZipFile(tmp_path / "chest.zip") as zf:
        card = zf.read("chest/docs/README.md").decode()
        meta = json.loads(zf.read("chest/configs/metadata.json"))
    icmd, linear = report["mean"]["icmd"], report["mean"]["linear"]
    assert f"| icmd | {icmd['psnr_all']:.2f} | {icmd['psnr_syn']:.2f} | {icmd['ssim_a']:.4f} |" in card
    assert f"| linear | {linear['psnr_all']:.2f} | {linear['psnr_syn']:.2f} |" in card
    assert f"{icmd['psnr_syn'] - linear['psnr_syn']:+.2f} dB" in card
    metrics = meta["eval_metrics"]
    assert metrics["psnr_syn_db"] == icmd["psnr_syn"] and metrics["num_cases"] == 1
    assert metrics["gain_over_linear_psnr_syn_db"] == pytest.approx(icmd["psnr_syn"] - linear["psnr_syn"])
    # a report for another factor is refused rather than shown next to this model
    report["factor"] = 4
    (tmp_path / "x4.json").write_text(json.dumps(report))
    with pytest.raises(ICMDError, match="the report is for factor x4, the bundle's factor is x3"):
        api.export(work, tmp_path / "other.zip", report=tmp_path / "x4.json")
    assert not (tmp_path / "other.zip").exists()


def test_a_warm_started_bundle_credits_the_priors_data(tmp_path):
    """Fine-tuned from a prior, the weights derive from the prior's images: the exported model card
    names them, their licences and whom to credit, and metadata.json's data_source says so."""
    image = tmp_path / "phantom.nii.gz"
    save_nifti(ct_phantom(PHANTOM_SHAPE, PHANTOM_SPACING), PHANTOM_SPACING, str(image))
    work = tmp_path / "work"
    api.plan(write_dataset(tmp_path / "dataset.json", [image]), work, factor=3, epochs=1, init="prior")
    models = work / "bundle" / "models"
    shutil.copy2(models / "prior.pt", models / "model.pt")  # stands in for the fine-tuned weights
    api.export(work, tmp_path / "warm.zip")
    with zipfile.ZipFile(tmp_path / "warm.zip") as zf:
        card = zf.read("warm/docs/README.md").decode()
        meta = json.loads(zf.read("warm/configs/metadata.json"))
        assert not [n for n in zf.namelist() if "/models/prior" in n], "the prior's files do not travel"
    prior = available()[3].card
    assert "## Starting weights" in card and f"the CT prior for x3 (preset {prior['preset']}" in card
    assert all(name in card for name in prior["data"])
    assert all(f"- {e['attribution']}" in card for e in prior["data"].values())
    for licence in prior["licences"]:
        assert licence in card and licence in meta["data_source"]
    assert "training started from the CT prior for x3" in meta["data_source"]


def test_metadata_is_verified_offline_against_the_schema_copy(tmp_path, monkeypatch):
    assert hashlib.md5(SCHEMA.read_bytes()).hexdigest() == SCHEMA_MD5
    template_meta = REPO / "bundle" / "configs" / "metadata.json"
    assert json.loads(template_meta.read_text())["schema"].endswith("/" + SCHEMA.name)

    def no_network(*args, **kwargs):
        raise OSError("network access during an offline check")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    verify_metadata(template_meta)
    broken = json.loads(template_meta.read_text())
    del broken["network_data_format"]["inputs"]["image"]["num_channels"]
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(ICMDError, match="does not match MONAI's bundle metadata schema.*num_channels"):
        verify_metadata(tmp_path / "metadata.json")


@requires_shared_data
def test_imported_bundle_predicts_like_the_original(archive, chest_x3, bundle_alone_output, tmp_path):
    work = tmp_path / "shared_work"
    result = run_cli("import", str(archive), "--work", str(work))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (work / "bundle" / "configs" / "inference.json").is_file()
    predicted = api.predict(work, chest_x3, tmp_path / "pred.nii.gz", quiet=True, output_dtype="float32")
    assert np.abs(voxels(predicted) - voxels(bundle_alone_output)).max() < MAX_HU_DIFF
    with pytest.raises(ICMDError, match="exists; pass --overwrite to replace it"):
        api.import_bundle(archive, work)
    api.import_bundle(archive, work, overwrite=True)
    assert (work / "bundle" / "models" / "model.pt").is_file()
    assert not list(work.glob(".icmd_import_*")), "no temporary folder is left behind"


def _zip_with(path, name, data=b"x", mode=None):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("b/configs/inference.json", "{}")
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.create_system = 3
            info.external_attr = mode << 16
        zf.writestr(info, data)
    return path


@pytest.mark.parametrize(
    "name, mode, expected",
    [
        ("/etc/evil.txt", None, "has an absolute path"),
        ("b/../../evil.txt", None, "has a '..' component"),
        ("b/scripts/link", stat.S_IFLNK | 0o777, "is a symbolic link"),
    ],
)
def test_import_refuses_members_that_escape_the_target(tmp_path, name, mode, expected):
    archive = _zip_with(tmp_path / "evil.zip", name, b"/etc/passwd" if mode else b"x", mode)
    with pytest.raises(ICMDError) as refused:
        api.import_bundle(archive, tmp_path / "work")
    assert str(refused.value) == f"{archive}: refused: member {name!r} {expected}"
    assert not (tmp_path / "work").exists() and not (tmp_path / "evil.txt").exists()


def test_import_refusal_is_one_line_on_the_command_line(tmp_path):
    archive = _zip_with(tmp_path / "evil.zip", "b/../../evil.txt")
    result = run_cli("import", str(archive), "--work", str(tmp_path / "work"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        == f"icmd_auto: error: {archive}: refused: member 'b/../../evil.txt' has a '..' component"
    )


def test_import_and_export_refuse_what_is_not_a_bundle(tmp_path):
    (tmp_path / "notes.zip").write_text("not a zip")
    with pytest.raises(ICMDError, match="notes.zip: not a zip archive"):
        api.import_bundle(tmp_path / "notes.zip", tmp_path / "w")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("model/weights.pt", "x")
    with pytest.raises(ICMDError, match="not a bundle archive"):
        api.import_bundle(tmp_path / "other.zip", tmp_path / "w")
    with pytest.raises(ICMDError, match="run `icmd_auto plan` first"):
        api.export(tmp_path / "w", tmp_path / "x.zip")
    assert not (tmp_path / "w").exists() and not (tmp_path / "x.zip").exists()


@requires_shared_data
def test_export_never_overwrites_without_overwrite(tiny_work, tmp_path):
    out = tmp_path / "taken.zip"
    out.write_text("someone else's file")
    with pytest.raises(ICMDError, match="taken.zip: exists; pass --overwrite to replace it"):
        api.export(tiny_work, out)
    assert out.read_text() == "someone else's file"
    with pytest.raises(ICMDError, match="must end with .zip"):
        api.export(tiny_work, tmp_path / "bundle.tar")
