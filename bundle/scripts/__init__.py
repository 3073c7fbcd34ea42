"""ICMD bundle code: what MONAI does not already provide.

    networks/   G_a (axial slice interpolation, CAIN-like, memory bank), G_c / G_s (HAN-style
                pixel interpolation along z), ICMDNet (the bundle's network_def)
    losses/     wavelet high-frequency loss, cross-view distillation, memory-bank losses
    handlers/   distillation schedule (stage, gamma), checkpoints and the best model, validation,
                metrics log, evaluation report
    degradation.py  thick-slice simulation D_r and scale-matched in-plane pairs
    training.py     one ICMD training iteration (internal learning + distillation levels)
    validation.py   self-supervised validation: PSNR on pairs from held-out thick slices
    inferers.py     plane-wise inference: whole planes in chunks, no window overlap, the planes
                    per call and memory layout measured on the machine that predicts
    runtime.py      precision (autocast) and CPU threads: the one definition of each
    transforms.py   CT normalisation and the transforms the configs chain
    evaluation.py   the simulated-thick protocol metrics
    io.py           NIfTI / DICOM series inputs, output dtype and geometry
    dicom_series.py which series of a DICOM folder (a study export) is the volume, and its reader

Modules import each other relatively, so the package works both as ``scripts`` inside a
bundle and as ``icmd_auto.bundle_template.scripts`` inside the installed tool.
"""

from . import (
    degradation,
    dicom_series,
    evaluation,
    handlers,
    inferers,
    io,
    losses,
    networks,
    runtime,
    training,
    transforms,
    validation,
)

__all__ = [
    "degradation",
    "dicom_series",
    "evaluation",
    "handlers",
    "inferers",
    "io",
    "losses",
    "networks",
    "runtime",
    "training",
    "transforms",
    "validation",
]
