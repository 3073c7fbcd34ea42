"""`icmd_auto demo`: the whole pipeline on a synthetic phantom, in a few minutes on a CPU.

1. make a thin (1.5 mm) synthetic CT phantom and its thick (4.5 mm) version;
2. plan on the thick volume (the planner finds factor 3 from the spacing);
3. train the generated bundle within the time budget;
4. predict thin slices from the thick volume;
5. evaluate on the thin phantom (simulated-thick protocol) against interpolation.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from . import api
from .dataset import write_dataset_json
from .report import format_report
from .synthetic import ct_phantom, save_nifti

logger = logging.getLogger("icmd_auto")

THIN_SPACING = (1.5, 1.5, 1.5)
FACTOR = 3


def run_demo(work: str | Path, minutes: float = 3.0, quiet: bool = False) -> dict:
    start = time.time()
    work = Path(work).expanduser().absolute()
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    thin = ct_phantom((96, 96, 73), THIN_SPACING, seed=0)
    save_nifti(thin, THIN_SPACING, str(data / "phantom_thin.nii.gz"))
    save_nifti(
        thin[:, :, ::FACTOR],
        (*THIN_SPACING[:2], THIN_SPACING[2] * FACTOR),
        str(data / "phantom_thick.nii.gz"),
    )
    dataset = write_dataset_json(
        data / "dataset.json",
        training=["phantom_thick.nii.gz"],
        test=["phantom_thin.nii.gz"],
        name="synthetic_phantom",
    )
    print(
        f"[1/5] synthetic phantom (not patient data): {data}/phantom_thick.nii.gz (4.5 mm) and "
        f"phantom_thin.nii.gz (1.5 mm ground truth)"
    )
    plans = api.plan(dataset, work, time_budget_min=minutes)
    print(
        f"[2/5] plan: factor {plans['factor']['value']} ({plans['factor']['reason']}); "
        f"preset {plans['preset']['value']}, {plans['training']['value']['epochs']} epochs"
    )
    summary = api.train(work, quiet=quiet)
    print(f"[3/5] trained in {summary['seconds']:.0f} s -> {summary['model']}")
    out = api.predict(
        work, data / "phantom_thick.nii.gz", work / "phantom_icmd.nii.gz", overwrite=True, quiet=quiet
    )
    print(f"[4/5] predicted {out}")
    report = api.evaluate(work, dataset, out=work / "evaluation.json", quiet=quiet)
    print(f"[5/5] evaluation ({work / 'evaluation.json'}):")
    print(format_report(report))
    print(f"demo finished in {time.time() - start:.0f} s")
    return report
