"""The ROOT optimizer: class, reference implementation and kernels.

Modules: `hyperparams` (the one hyperparameter table), `root` (the `ROOT` class), `functional` (`root()`, `adamw()`),
`views` (per-parameter matrix views), `clip`, `newton_schulz` (kernels), `distributed` (DDP / FSDP2 execution),
`reference` (`RootReference`, the specification). Schedules live in `root_hf.schedules`. The functional `root` is not
re-exported here, so that `root_hf.optim.root` always names the module.
"""

from ..schedules import get_schedule, schedule_band
from .newton_schulz import orthogonalize
from .reference import RootReference
from .root import ROOT

__all__ = ["ROOT", "RootReference", "get_schedule", "orthogonalize", "schedule_band"]
