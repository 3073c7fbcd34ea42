from . import reparam
from .axial import AxialSliceInterpolator
from .han import HANInterpolator
from .icmd import FUSIONS, VIEWS, ICMDNet
from .memory import MemoryBank

__all__ = [
    "AxialSliceInterpolator",
    "HANInterpolator",
    "ICMDNet",
    "MemoryBank",
    "reparam",
    "FUSIONS",
    "VIEWS",
]
