"""The ROOT optimizer: class, functional API, reference implementation and kernels."""

from .coefficients import get_schedule, schedule_band
from .orthogonalize import orthogonalize
from .reference import RootReference
from .root import ROOT, adamw, root

__all__ = ["ROOT", "RootReference", "adamw", "get_schedule", "orthogonalize", "root", "schedule_band"]
