from .checkpoint import BestModelSaver, GradScalerState, RNGState, TrainingCheckpoint, latest_checkpoint
from .distillation import DistillationSchedule
from .distributed import RankSeed
from .metrics_log import MetricsLog
from .report import SynthesisReport
from .validation import FinalValidation, ValidationLog

__all__ = [
    "BestModelSaver",
    "DistillationSchedule",
    "FinalValidation",
    "GradScalerState",
    "MetricsLog",
    "RNGState",
    "RankSeed",
    "SynthesisReport",
    "TrainingCheckpoint",
    "ValidationLog",
    "latest_checkpoint",
]
