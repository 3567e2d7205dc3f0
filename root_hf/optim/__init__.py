"""The ROOT optimizer: class, reference implementation and kernels.

The functional API lives in :mod:`root_hf.optim.root` (``root``, ``adamw``); it is not re-exported here so that
``root_hf.optim.root`` always names the module.
"""

from ..schedules import get_schedule, schedule_band
from .orthogonalize import orthogonalize
from .reference import RootReference
from .root import ROOT

__all__ = ["ROOT", "RootReference", "get_schedule", "orthogonalize", "schedule_band"]
