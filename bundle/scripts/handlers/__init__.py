from .checkpoint import RNGState, TrainingCheckpoint, latest_checkpoint
from .distillation import DistillationSchedule
from .distributed import RankSeed
from .metrics_log import MetricsLog
from .report import SynthesisReport

__all__ = [
    "DistillationSchedule",
    "MetricsLog",
    "RNGState",
    "RankSeed",
    "SynthesisReport",
    "TrainingCheckpoint",
    "latest_checkpoint",
]
