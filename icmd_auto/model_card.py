"""The exported bundle's model card: docs/README.md and metadata ``eval_metrics`` from the work folder.

What a model-zoo user needs before running someone else's bundle: what it was trained on, how to
train it again, what it measured and what it is for. Every number comes from a file of the work
folder (the bundle's configs, ``fingerprint.json``, ``logs/train_metrics.jsonl``, the card of
the prior a warm start began from and the evaluation report ``icmd_auto evaluate`` wrote); where
there is no report the card says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ICMDError

REPORT_METHODS = ("icmd", "linear", "cubic", "nearest")
REPORT_METRICS = ("psnr_all", "psnr_syn", "ssim_a", "ssim_c", "ssim_s")
PROTOCOL = (
    "simulated-thick protocol: each thin test volume G is made thick with the bundle's factor and "
    "slice profile, synthesised back and compared with G over the covered slices; HU clipped to "
    "[-1024, 3071] and scaled to [0, 1]; PSNR on all voxels and on synthesized slices only, SSIM "
    "averaged over axial, coronal and sagittal slices"
)
# where the model card ends and the bundle's documentation (data, commands, evaluation, the method's
# switches, intended use, references, licence) begins
DOCS_MARKER = "<!-- bundle documentation -->"


def read_report(path: Path, factor: int) -> dict:
    """An ``icmd_auto evaluate`` report, checked to belong to a bundle of this factor."""
    try:
        report = json.loads(path.read_text())
        mean = report["mean"]
        for method in ("icmd", "linear"):
            for metric in REPORT_METRICS:
                float(mean[method][metric])
        report_factor, num_cases = int(report["factor"]), int(report["num_cases"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ICMDError(f"{path}: not an `icmd_auto evaluate` report ({type(e).__name__}: {e})") from None
    if report_factor != factor:
        raise ICMDError(
            f"{path}: the report is for factor x{report_factor}, the bundle's factor is x{factor}"
        )
    if num_cases < 1:
        raise ICMDError(f"{path}: the report holds no evaluated case")
    return report


def eval_metrics(report: dict, slice_profile: str) -> dict:
    """metadata.json ``eval_metrics``: the method's means, linear interpolation's, and the gain."""
    icmd, linear = report["mean"]["icmd"], report["mean"]["linear"]
    metrics = {
        "protocol": PROTOCOL,
        "slice_profile": slice_profile,
        "num_cases": int(report["num_cases"]),
        "psnr_all_db": icmd["psnr_all"],
        "psnr_syn_db": icmd["psnr_syn"],
        "ssim_a": icmd["ssim_a"],
        "ssim_c": icmd["ssim_c"],
        "ssim_s": icmd["ssim_s"],
        "linear_psnr_syn_db": linear["psnr_syn"],
    }
    metrics["gain_over_linear_psnr_syn_db"] = icmd["psnr_syn"] - linear["psnr_syn"]
    return metrics


def results_section(report: dict | None, report_path: Path | None, slice_profile: str) -> str:
    if report is None:
        return (
            "## Measured results\n\n"
            "None. No evaluation report was found in the work folder when this bundle was exported, so "
            "this bundle carries no measured numbers. Measure it on thin CT of your own with the "
            "evaluation command below (or `icmd_auto evaluate` before `icmd_auto export`).\n"
        )
    mean = report["mean"]
    rows = [
        "| method | PSNR all (dB) | PSNR synthesized (dB) | SSIM_a | SSIM_c | SSIM_s |",
        "|---|---|---|---|---|---|",
    ]
    for method in REPORT_METHODS:
        if method in mean:
            m = mean[method]
            rows.append(
                f"| {method} | {m['psnr_all']:.2f} | {m['psnr_syn']:.2f} | {m['ssim_a']:.4f} | "
                f"{m['ssim_c']:.4f} | {m['ssim_s']:.4f} |"
            )
    gain = mean["icmd"]["psnr_syn"] - mean["linear"]["psnr_syn"]
    return (
        "## Measured results\n\n"
        f"From `{report_path.name}` ({report['num_cases']} thin test volume(s), x{report['factor']}, "
        f"slice profile `{slice_profile}`), the {PROTOCOL}:\n\n" + "\n".join(rows) + "\n\n"
        f"Gain over linear interpolation on synthesized slices: {gain:+.2f} dB.\n"
    )


def _training_data(work: Path) -> str:
    fingerprint = work / "fingerprint.json"
    if not fingerprint.is_file():
        return "not recorded (the work folder has no fingerprint.json)"
    f = json.loads(fingerprint.read_text())
    spacing = " x ".join(f"{s:g}" for s in f["median_spacing"])
    shape = " x ".join(f"{s:g}" for s in f["median_shape"])
    return (
        f"dataset `{f['dataset']}`: {f['num_cases']} thick CT volume(s), median spacing {spacing} mm, "
        f"median shape {shape} voxels, intensity 0.5/99.5 percentiles {f['intensity']['p0.5']:g} / "
        f"{f['intensity']['p99.5']:g} HU"
    )


def _trained_for(bundle: Path) -> str:
    log = bundle / "logs" / "train_metrics.jsonl"
    lines = log.read_text().strip().splitlines() if log.is_file() else []
    if not lines:
        return "not recorded (no logs/train_metrics.jsonl)"
    last = json.loads(lines[-1])
    return f"{last['epoch']} epochs, {last['iteration']} iterations; last logged loss {last['total']:.4g}" + (
        f" (distillation stage {last['stage']})" if last.get("cmd_c") or last.get("cmd_s") else ""
    )


def starting_prior(bundle: Path) -> dict | None:
    """The card of the prior the bundle's training started from (warm start, or zero-shot, where the
    prior is the model), or None when it started from scratch."""
    train = json.loads((bundle / "configs" / "train.json").read_text())
    card = bundle / "models" / "prior.json"  # bundle_writer.PRIOR_CARD
    return json.loads(card.read_text()) if train.get("init_weights") and card.is_file() else None


def prior_licences(prior: dict) -> list[str]:
    """The licences of a prior's data: its card's combined list, else its volumes', else its statement."""
    per_volume = sorted({e["licence"] for e in prior.get("data", {}).values() if e.get("licence")})
    return list(prior.get("licences") or per_volume or [prior.get("data_licence", "not stated")])


def prior_summary(prior: dict) -> str:
    """One line: which prior, how long it trained, on how many volumes, under which licences."""
    return (
        f"the CT prior for x{prior['factor']} (preset {prior.get('preset', '?')}, {prior.get('iterations', '?')} "
        f"iterations on {prior.get('device', '?')}) pretrained on {len(prior.get('data', {}))} CT volume(s); "
        f"data licences {', '.join(prior_licences(prior))}"
    )


def prior_section(prior: dict) -> str:
    """The prior's data and whom to credit: the weights derive from those images."""
    data = prior.get("data", {})
    credits = list(dict.fromkeys(e["attribution"] for e in data.values() if e.get("attribution")))
    if not credits and prior.get("data_licence"):
        credits = [prior["data_licence"]]
    lines = [
        "## Starting weights\n",
        f"Training started from {prior_summary(prior)}. This model's weights derive from those images "
        "too: cite them when you use or publish it.\n",
        f"Volumes: {', '.join(sorted(data)) or 'not recorded'}.\n",
        "Attribution:\n",
        *[f"- {c}" for c in credits or ["not recorded in the prior's card"]],
    ]
    return "\n".join(lines) + "\n"


def model_card(bundle: Path, work: Path, meta: dict, report: dict | None, report_path: Path | None) -> str:
    """docs/README.md of an exported bundle: this model's facts and results, then the bundle's documentation."""
    readme = (bundle / "docs" / "README.md").read_text()
    train = json.loads((bundle / "configs" / "train.json").read_text())
    evaluate = json.loads((bundle / "configs" / "evaluate.json").read_text())
    icmd, arch = train["icmd"], train["architecture"]
    factor = icmd["factor"]
    prior = starting_prior(bundle)
    intensity = train["intensity"]
    views = icmd.get("views", ["a", "c", "s"])
    networks = []
    if "a" in views:
        networks.append(
            f"G_a width {arch['axial']['width']}, {arch['axial']['groups']} group(s) x "
            f"{arch['axial']['blocks']} block(s)"
        )
    if {"c", "s"} & set(views):
        networks.append(
            f"G_c/G_s width {arch['planar']['width']}, {arch['planar']['groups']} group(s) x "
            f"{arch['planar']['blocks']} block(s)"
        )
    pairs = [
        name
        for key, name in (("internal_pairs", "internal pairs"), ("inplane_pairs", "in-plane pairs"))
        if icmd.get(key)
    ]
    distilled = "a" in views and icmd.get("lambda_cmd", 0) > 0 and icmd.get("cmd_views")
    schedule = (
        f"{icmd['num_levels']} distillation level(s), gamma {icmd['gamma']}"
        if distilled
        else "no distillation"
    )
    facts = [
        ("factor", f"x{factor}: {factor - 1} synthesized slices between neighbouring input slices"),
        ("training data", _training_data(work)),
        ("networks", "; ".join(networks) + f"; fusion {icmd.get('fusion', 'mean3')}"),
        (
            "training",
            f"patch {' x '.join(str(p) for p in train['patch_size'])}, batch {train['batch_size']}, "
            f"{train['epochs']} epochs x {train['iterations_per_epoch']} iterations, Adam lr "
            f"{train['learning_rate']:g} (cosine), G_c/G_s on {' and '.join(pairs) or 'no pairs'}, {schedule}",
        ),
        ("starting weights", prior_summary(prior) + " (below)" if prior else "random (from scratch)"),
        ("trained for", _trained_for(bundle)),
        (
            "intensity",
            f"clip {intensity['clip_low']:g} .. {intensity['clip_high']:g} HU, standardised with mean "
            f"{intensity['mean']:.4g} and std {intensity['std']:.4g} HU",
        ),
    ]
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in facts])
    head = (
        f"# {meta['name']}\n\n{meta['description']}\n\n"
        f"Version {meta['version']}, generated by {meta.get('generated_by', 'ICMD-Auto')}.\n\n"
        f"## This model\n\n{table}\n\n"
        f"{results_section(report, report_path, evaluate.get('slice_profile', 'removal'))}\n"
        + (f"{prior_section(prior)}\n" if prior else "")
    )
    return head + DOCS_MARKER + "\n" + bundle_documentation(readme)


def bundle_documentation(readme: str) -> str:
    """The bundle's own documentation from its first section on, without a previous model card's head."""
    if DOCS_MARKER in readme:  # a bundle exported (and imported) before
        return readme.split(DOCS_MARKER, 1)[1].lstrip("\n")
    start = readme.find("\n## ")
    return readme[start + 1 :] if start >= 0 else readme
