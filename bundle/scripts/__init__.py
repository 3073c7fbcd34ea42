"""ICMD bundle code: what MONAI does not already provide.

    networks/   G_a (axial slice interpolation, CAIN-like, memory bank), G_c / G_s (HAN-style
                pixel interpolation along z), ICMDNet (the bundle's network_def)
    losses/     wavelet high-frequency loss, cross-view distillation, memory-bank losses
    handlers/   distillation schedule (stage, gamma), metrics log, evaluation report
    degradation.py  thick-slice simulation D_r and scale-matched in-plane pairs
    training.py     one ICMD training iteration (internal learning + distillation levels)
    inference.py    sliding-window slice synthesis with exact output geometry
    transforms.py   CT normalisation and the transforms the configs chain
    evaluation.py   the simulated-thick protocol metrics
    io.py           NIfTI / DICOM series inputs, output dtype and geometry

Modules import each other relatively, so the package works both as ``scripts`` inside a
bundle and as ``icmd_auto.bundle_template.scripts`` inside the installed tool.
"""

from . import degradation, evaluation, handlers, io, losses, networks, training, transforms

__all__ = ["degradation", "evaluation", "handlers", "io", "losses", "networks", "training", "transforms"]
