"""Write a plan into a MONAI bundle: <work>/bundle is the template with the plan's values.

The plan's values are merged into the bundle's own configs (not kept in a side file), so the
generated bundle is an ordinary MONAI bundle: ``configs/train.json``, ``inference.json`` and
``evaluate.json`` hold every number, and ``python -m monai.bundle run`` needs nothing else.
Which keys come from the plan is listed in ``PLAN_KEYS`` below and in docs/BUNDLE.md.
"""

from __future__ import annotations

import json
import shutil
from datetime import date
from pathlib import Path

import monai
import numpy as np
import torch

from . import __version__
from .fingerprint import intensity_window
from .template import TEMPLATE_DIR

TEMPLATE_PARTS = ("configs", "scripts", "docs", "LICENSE")
# the keys the plan sets, per config file (everything else keeps the template's default)
PLAN_KEYS = {
    "train.json": (
        "icmd",
        "intensity",
        "architecture",
        "patch_size",
        "batch_size",
        "epochs",
        "iterations_per_epoch",
        "learning_rate",
        "time_limit_s",
        "validation",
        "amp",
        "amp_dtype",
        "threads",
        "cache_on_device",
        "datalist",
        "dicom_series",
        "init_weights",
        "seed",
    ),
    "inference.json": ("icmd", "intensity", "architecture", "plane_inference", "seed"),
}
PRIOR_FILE = "prior.pt"  # models/prior.pt: the weights a warm start begins from
PRIOR_CARD = "prior.json"  # models/prior.json: their card (data, licences), for the exported model card
INFERENCE_ICMD_KEYS = ("factor", "views", "fusion", "use_memory", "mem_items", "share_cs", "axial_slices")


def copy_template(destination: Path) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    for part in TEMPLATE_PARTS:
        src = TEMPLATE_DIR / part
        dst = destination / part
        if src.is_dir():
            shutil.copytree(
                src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        else:
            shutil.copy2(src, dst)


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _write(path: Path, content: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(content, indent=4) + "\n")
    tmp.replace(path)


def plan_values(plan: dict, training_images: list[str], dicom_series: list[str] | None = None) -> dict:
    """The config values a plan sets (train.json's view; inference.json takes a subset).

    ``dicom_series``: the SeriesInstanceUIDs taken from training folders that hold several series
    (named or found); the bundle's DICOM reader is told them.
    """
    training = plan["training"]["value"]
    icmd = {
        "factor": plan["factor"]["value"],
        "level_start_epochs": training["level_start_epochs"],
        "cmd_planes": plan["cmd_planes"]["value"],
    }
    icmd.update(plan["method"]["value"])
    return {
        "icmd": icmd,
        "intensity": plan["intensity"]["value"],
        "architecture": plan["architecture"]["value"],
        "patch_size": plan["patch_size"]["value"],
        "batch_size": plan["batch_size"]["value"],
        "epochs": training["epochs"],
        "iterations_per_epoch": training["iterations_per_epoch"],
        "learning_rate": training["learning_rate"],
        "time_limit_s": training["time_limit_s"],
        "validation": plan["validation"]["value"],
        "amp": plan["amp"]["value"],
        "amp_dtype": plan["amp_dtype"]["value"],
        "threads": plan.get("threads", {}).get("value", 0),
        "cache_on_device": plan.get("cache_on_device", {}).get("value", False),
        "datalist": [str(p) for p in training_images],
        "init_weights": f"$@bundle_root + '/models/{PRIOR_FILE}'"
        if plan.get("init", {}).get("value", {}).get("mode") == "prior"
        else None,
        "dicom_series": list(dicom_series) if dicom_series else None,
        # a plan made before the inferer measured its calls keeps its fixed planes per call
        "plane_inference": {"tune": False, **plan["plane_inference"]["value"]},
        "seed": plan["seed"]["value"],
    }


def metadata(plan: dict, template_meta: dict) -> dict:
    factor = plan["factor"]["value"]
    target_z = plan["target_spacing_z"]["value"]
    intensity = plan["intensity"]["value"]
    meta = dict(template_meta)
    meta.update(
        {
            "monai_version": monai.__version__,
            "pytorch_version": torch.__version__.split("+")[0],
            "numpy_version": np.__version__,
            "required_packages_version": {**template_meta.get("required_packages_version", {})},
            "name": f"ICMD CT slice synthesis x{factor} ({plan['dataset']})",
            "task": f"CT slice synthesis: raise the slice density by {factor}x (self-supervised, no thin-slice ground truth)",
            "description": (
                f"Incremental Cross-view Mutual Distillation (ICMD, CVPR 2022) trained on {plan['dataset']} "
                f"by ICMD-Auto {__version__}: thick CT in, {factor}x more slices out, known slices copied, "
                f"geometry preserved (target slice spacing {target_z:.4g} mm)"
            ),
            "generated_by": f"icmd_auto {__version__} on {date.today().isoformat()}",
        }
    )
    fmt = meta["network_data_format"]
    fmt["inputs"]["image"]["value_range"] = list(intensity_window(intensity))
    fmt["outputs"]["pred"]["spatial_shape"] = ["8*n", "8*n", f"2*n*{factor}"]  # r x the input's slices
    fmt["outputs"]["pred"]["upsampling_factor_z"] = factor
    fmt["outputs"]["pred"]["target_spacing_z_mm"] = target_z
    fmt["outputs"]["pred"]["value_range"] = fmt["inputs"]["image"]["value_range"]
    return meta


def write_bundle(
    plan: dict, work: Path, training_images: list[str], dicom_series: list[str] | None = None
) -> Path:
    """Copy the template to ``<work>/bundle`` and write the plan into its configs.

    An existing bundle's code and configs are replaced; its ``models/`` and ``logs/`` are kept.
    """
    bundle = Path(work) / "bundle"
    copy_template(bundle)
    values = plan_values(plan, training_images, dicom_series)
    configs = bundle / "configs"
    train = _read(configs / "train.json")
    for key in PLAN_KEYS["train.json"]:
        if key == "icmd":
            train["icmd"].update(values["icmd"])
        else:
            train[key] = values[key]
    _write(configs / "train.json", train)
    inference = _read(configs / "inference.json")
    for key in PLAN_KEYS["inference.json"]:
        if key == "icmd":
            merged = {**train["icmd"]}
            inference["icmd"].update({k: merged[k] for k in INFERENCE_ICMD_KEYS if k in merged})
        else:
            inference[key] = values[key]
    _write(configs / "inference.json", inference)
    evaluate = _read(configs / "evaluate.json")
    evaluate["slice_profile"] = plan["slice_profile"]["value"]
    _write(configs / "evaluate.json", evaluate)
    _write(configs / "metadata.json", metadata(plan, _read(configs / "metadata.json")))
    init = plan.get("init", {}).get("value", {})
    if (
        init.get("mode") == "prior"
    ):  # warm start: the prior's weights inside the bundle, which stays self-contained
        (bundle / "models").mkdir(exist_ok=True)
        shutil.copy2(init["weights"], bundle / "models" / PRIOR_FILE)
        card = Path(init["weights"]).with_suffix(".json")
        if card.is_file():
            shutil.copy2(card, bundle / "models" / PRIOR_CARD)
    return bundle
