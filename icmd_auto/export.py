"""Share a trained bundle: a model-zoo archive out (``export``), a shared archive in (``import``).

The archive holds one folder named after it, ``<name>/``, as model-zoo archives do: ``configs/``,
``scripts/``, ``models/model.pt`` (and ``models/model.ts`` with ``--torchscript``), ``docs/README.md``
(the model card) and ``LICENSE``. Training state (checkpoints, logs) stays in the work folder, and
the training configuration lists no local file paths: ``datalist`` reads ``--dataset_dir``.
Unzipped anywhere, the folder runs with ``python -m monai.bundle run`` and no icmd_auto.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

from . import runner
from .errors import ICMDError
from .model_card import eval_metrics, model_card, prior_summary, read_report, starting_prior
from .template import TEMPLATE_DIR

logger = logging.getLogger("icmd_auto")

SCHEMA = Path(__file__).resolve().parent / "schemas" / "meta_schema_20240725.json"
SCHEMA_MD5 = "06954cad2cc5d3784e72077ac76f0fc8"  # MONAI's recorded hash of the released schema
EXPORTED_PARTS = ("configs", "scripts", "docs", "LICENSE")
REQUIRED_FILES = (
    "configs/train.json",
    "configs/inference.json",
    "configs/metadata.json",
    "models/model.pt",
    "scripts/__init__.py",
)
# the slice count the TorchScript model is traced at, and a second one it is checked at: inference
# windows span a volume's whole z-range, so the traced model must not depend on it
TRACE_SLICES, CHECK_SLICES = 8, 11
TRACE_XY = 128  # the traced graph unrolls the loop over planes: it takes this in-plane size only
TRACE_TOLERANCE = 1e-4  # standardised units; the traced graph runs the same operations


@contextlib.contextmanager
def _monai_logs_quiet():
    """MONAI's bundle tools log their every argument at INFO; keep the user's terminal for our lines."""
    import monai.bundle  # noqa: F401  (its import sets these loggers to INFO)

    loggers = [logging.getLogger(name) for name in ("monai.bundle.scripts", "monai.apps")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def verify_metadata(meta_file: Path) -> None:
    """MONAI's ``verify_metadata`` against the offline copy of the schema (never a download)."""
    from monai.bundle import verify_metadata as monai_verify_metadata
    from monai.utils import optional_import

    if not SCHEMA.is_file():
        raise ICMDError(
            f"{SCHEMA}: the offline copy of MONAI's metadata schema is missing; reinstall icmd_auto"
        )
    if not optional_import("jsonschema")[1]:
        raise ICMDError("validating bundle metadata needs the jsonschema package: pip install jsonschema")
    named = Path(str(json.loads(Path(meta_file).read_text()).get("schema", ""))).name
    if named != SCHEMA.name:
        raise ICMDError(f"{meta_file}: names the schema {named!r}; icmd_auto validates against {SCHEMA.name}")
    try:
        monai_verify_metadata(meta_file=str(meta_file), filepath=str(SCHEMA), hash_val=SCHEMA_MD5)
    except ValueError as e:
        reason = " ".join(str(e).split())
        raise ICMDError(
            f"{meta_file}: does not match MONAI's bundle metadata schema: {reason[:300]}"
        ) from None


def _stage(bundle: Path, stage: Path) -> None:
    """Copy what a model-zoo bundle holds: the template's parts and the trained weights."""
    for part in EXPORTED_PARTS:
        src = bundle / part
        if src.is_dir():
            shutil.copytree(src, stage / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.is_file():
            shutil.copy2(src, stage / part)
    (stage / "models").mkdir()
    shutil.copy2(bundle / "models" / "model.pt", stage / "models" / "model.pt")
    # the training images were local paths of the exporting machine: read --dataset_dir instead
    # (and the series named in them identify its patients' scans: not shared either)
    train_path = stage / "configs" / "train.json"
    train = json.loads(train_path.read_text())
    template = json.loads((TEMPLATE_DIR / "configs" / "train.json").read_text())
    train["datalist"], train["dicom_series"] = template["datalist"], template["dicom_series"]
    train["init_weights"] = template[
        "init_weights"
    ]  # the trained model.pt travels, not the prior it started from
    train_path.write_text(json.dumps(train, indent=4) + "\n")


def _network(stage: Path) -> torch.nn.Module:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(stage / "configs" / "inference.json"))
    parser.update({"bundle_root": str(stage), **runner.private_targets(stage, ["inference.json"])})
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(stage / "models" / "model.pt", map_location="cpu", weights_only=True))
    return net.eval()


def export_torchscript(stage: Path) -> list[int]:
    """``models/model.ts`` through MONAI's ``ckpt_export``, traced; returns the traced input shape.

    ``torch.jit.script`` cannot compile ICMDNet (its forward also takes the training objective, a
    Python callable), so the model is traced (``use_trace=True``) at a TRACE_XY x TRACE_XY in-plane
    size (the loop over planes is unrolled: that size only) and checked against the state-dict network at two slice counts.
    """
    from monai.bundle import ckpt_export

    shape = [1, 1, TRACE_XY, TRACE_XY, TRACE_SLICES]
    model_ts = stage / "models" / "model.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        ckpt_export(
            net_id="network_def",
            filepath=str(model_ts),
            ckpt_file=str(stage / "models" / "model.pt"),
            meta_file=str(stage / "configs" / "metadata.json"),
            config_file=str(stage / "configs" / "inference.json"),
            bundle_root=str(stage),
            **runner.private_targets(stage, ["inference.json"]),  # the file keeps `scripts.…`
            use_trace=True,
            input_shape=shape,
            converter_kwargs={"verify": True, "rtol": TRACE_TOLERANCE, "atol": TRACE_TOLERANCE},
        )
        net = _network(stage)
        traced = torch.jit.load(str(model_ts), map_location="cpu").eval()
        volume = torch.randn(*shape[:4], CHECK_SLICES, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = float((traced(volume) - net(volume)).abs().max())
    if not diff <= TRACE_TOLERANCE:
        raise ICMDError(
            f"the traced TorchScript model differs from the network by {diff:.3g} at {CHECK_SLICES} slices; "
            "export without --torchscript"
        )
    return shape


def _zip(stage: Path, archive: Path) -> int:
    # checking the staged bundle (metadata, TorchScript) imports its scripts: no bytecode travels
    files = sorted(
        p for p in stage.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in files:
            zf.write(path, f"{stage.name}/{path.relative_to(stage).as_posix()}")
    return len(files)


def export_bundle(
    work: str | Path,
    out: str | Path,
    torchscript: bool = False,
    report: str | Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Pack ``<work>/bundle`` into the model-zoo archive ``out`` (.zip), written atomically.

    The model card's results table and metadata ``eval_metrics`` come from ``report`` (default
    ``<work>/evaluation.json``, what ``icmd_auto evaluate`` writes) when there is one. The metadata is
    validated offline against MONAI's schema before anything is written.
    """
    work = Path(work).expanduser().absolute()
    bundle = runner.bundle_dir(work)
    runner.trained_model(bundle)
    out = Path(out).expanduser().absolute()
    if out.suffix.lower() != ".zip":
        raise ICMDError(f"{out}: the archive name must end with .zip")
    if out.exists() and not overwrite:
        raise ICMDError(f"{out}: exists; pass --overwrite to replace it")
    if report is not None and not Path(report).expanduser().is_file():
        raise ICMDError(f"{report}: file not found")
    report_path = Path(report).expanduser().absolute() if report else work / "evaluation.json"
    factor = int(json.loads((bundle / "configs" / "inference.json").read_text())["icmd"]["factor"])
    report_data = read_report(report_path, factor) if report_path.is_file() else None
    out.parent.mkdir(parents=True, exist_ok=True)
    with _monai_logs_quiet(), tempfile.TemporaryDirectory(prefix=".icmd_export_", dir=out.parent) as tmp:
        stage = Path(tmp) / out.stem
        _stage(bundle, stage)
        meta_path = stage / "configs" / "metadata.json"
        meta = json.loads(meta_path.read_text())
        slice_profile = json.loads((stage / "configs" / "evaluate.json").read_text()).get("slice_profile")
        if report_data is not None:
            meta["eval_metrics"] = eval_metrics(report_data, slice_profile)
        else:
            meta.pop("eval_metrics", None)
        prior = starting_prior(bundle)
        if prior is not None:  # the weights derive from the prior's images too: say so where MONAI looks
            template_source = json.loads((TEMPLATE_DIR / "configs" / "metadata.json").read_text())[
                "data_source"
            ]
            meta["data_source"] = (
                f"{template_source}; training started from {prior_summary(prior)} (docs/README.md)"
            )
        meta_path.write_text(json.dumps(meta, indent=4) + "\n")
        card = model_card(bundle, work, meta, report_data, report_path if report_data else None)
        (stage / "docs" / "README.md").write_text(card)
        verify_metadata(meta_path)
        traced_shape = export_torchscript(stage) if torchscript else None
        partial = Path(tmp) / "archive.zip"
        count = _zip(stage, partial)
        os.replace(partial, out)
    return {
        "archive": str(out),
        "files": count,
        "bytes": out.stat().st_size,
        "report": str(report_path) if report_data else None,
        "torchscript_input_shape": traced_shape,
    }


# --- import -----------------------------------------------------------------------------------


def _checked_members(zf: zipfile.ZipFile, archive: Path) -> list[zipfile.ZipInfo]:
    """Every member, refusing any that could write outside the target folder."""
    members = zf.infolist()
    for info in members:
        name = info.filename
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
            raise ICMDError(f"{archive}: refused: member {name!r} has an absolute path")
        if ".." in re.split(r"[/\\]", name):
            raise ICMDError(f"{archive}: refused: member {name!r} has a '..' component")
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise ICMDError(f"{archive}: refused: member {name!r} is a symbolic link")
        if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ICMDError(f"{archive}: refused: member {name!r} is not a regular file or folder")
    return members


def _bundle_prefix(names: set[str], archive: Path) -> str:
    """'' when the bundle is at the archive's top, else its one folder 'name/'."""
    if "configs/inference.json" in names:
        prefix = ""
    else:
        found = sorted(
            n[: -len("configs/inference.json")] for n in names if n.endswith("/configs/inference.json")
        )
        found = [p for p in found if p.count("/") == 1]
        if len(found) != 1:
            raise ICMDError(
                f"{archive}: not a bundle archive (expected configs/inference.json at the top or in one folder)"
                if not found
                else f"{archive}: holds {len(found)} bundles ({', '.join(found)}); expected one"
            )
        prefix = found[0]
    missing = [f for f in REQUIRED_FILES if prefix + f not in names]
    if missing:
        raise ICMDError(f"{archive}: not a complete bundle; missing {', '.join(missing)}")
    return prefix


def import_bundle(archive: str | Path, work: str | Path, overwrite: bool = False) -> Path:
    """Unpack a shared bundle archive into ``<work>/bundle``, ready for ``predict`` and ``evaluate``.

    Every member is checked before anything is written: absolute paths, '..' components, symbolic
    links and special files are refused. The bundle is unpacked beside the target and renamed into
    place; an existing ``<work>/bundle`` is only replaced with ``overwrite``.
    """
    archive = Path(archive).expanduser().absolute()
    if not archive.is_file():
        raise ICMDError(f"{archive}: file not found")
    if not zipfile.is_zipfile(archive):
        raise ICMDError(f"{archive}: not a zip archive")
    work = Path(work).expanduser().absolute()
    target = work / "bundle"
    if target.exists() and not overwrite:
        raise ICMDError(f"{target}: exists; pass --overwrite to replace it")
    with zipfile.ZipFile(archive) as zf:
        members = _checked_members(zf, archive)
        prefix = _bundle_prefix({m.filename for m in members}, archive)
        work.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".icmd_import_", dir=work))
        try:
            staged = tmp / "bundle"
            staged.mkdir()
            for info in members:
                if not info.filename.startswith(prefix) or info.filename == prefix:
                    continue  # outside the bundle folder (e.g. __MACOSX/ entries)
                dest = staged / info.filename[len(prefix) :]
                if not dest.resolve().is_relative_to(staged.resolve()):  # checked above; kept as a guard
                    raise ICMDError(
                        f"{archive}: refused: member {info.filename!r} points outside the target folder"
                    )
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            if target.exists():
                os.replace(target, tmp / "previous")
            os.replace(staged, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
