from .distillation import agreement_mask, cross_view_distillation
from .memory import memory_losses
from .wavelet import DWT2D, WaveletHighFrequencyLoss

__all__ = ["DWT2D", "WaveletHighFrequencyLoss", "agreement_mask", "cross_view_distillation", "memory_losses"]
