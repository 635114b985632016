"""The engine's algorithm options, checked once (at construction and when a state_dict loads)."""

from dataclasses import dataclass

from .connectivity import check_connectivity
from .growth import GROWTHS
from .init import check_choice
from .lr_ramp import check_lr_ramp
from .sampling import SAMPLINGS

__all__ = ["EngineOptions", "PRUNES", "REDISTRIBUTIONS", "SCOPES"]

PRUNES = ("magnitude", "set")
REDISTRIBUTIONS = ("momentum", "magnitude", "nonzeros", "none")
SCOPES = ("layer", "global")


@dataclass(frozen=True)
class EngineOptions:
    """How a :class:`~sparsemom_ext.SparseMomentum` prunes, redistributes and grows (its docstring
    says what each means)."""

    growth: str = "momentum"
    prune: str = "magnitude"
    redistribution: str = "momentum"
    scope: str = "layer"
    candidates: float = 1.0
    sampling: str = "grabo"
    window: int = 100
    connectivity: str = "floor"
    lr_ramp_steps: int = 0
    lr_ramp_start: float = 0.02

    def __post_init__(self):
        check_choice("growth", self.growth, tuple(GROWTHS))
        check_choice("prune", self.prune, PRUNES)
        check_choice("redistribution", self.redistribution, REDISTRIBUTIONS)
        check_choice("scope", self.scope, SCOPES)
        check_choice("sampling", self.sampling, SAMPLINGS)
        check_connectivity(self.connectivity)
        check_lr_ramp(self.lr_ramp_steps, self.lr_ramp_start)
        object.__setattr__(self, "lr_ramp_start", float(self.lr_ramp_start))
        candidates, window = self.candidates, self.window
        if isinstance(candidates, bool) or not isinstance(candidates, (int, float)) or not 0.0 < candidates <= 1e6:
            raise ValueError(f"candidates must be a positive number; got {candidates!r}")
        object.__setattr__(self, "candidates", float(candidates))
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int; got {window!r}")
        if self.scope == "global" and self.growth == "random":
            raise ValueError("scope='global' grows by comparing scores across layers; growth='random' has "
                             "none: use scope='layer' or another growth")

    @property
    def needs_momentum(self) -> bool:
        """Whether the optimizer's momentum is read (growth or redistribution by momentum)."""
        return self.growth == "momentum" or self.redistribution == "momentum"
