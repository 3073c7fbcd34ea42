from .checkpoint import BestModelSaver, GradScalerState, RNGState, TrainingCheckpoint, latest_checkpoint
from .distillation import DistillationSchedule
from .distributed import RankSeed
from .metrics_log import MetricsLog
from .progress import RunProgress
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
    "RunProgress",
    "SynthesisReport",
    "TrainingCheckpoint",
    "ValidationLog",
    "latest_checkpoint",
]
