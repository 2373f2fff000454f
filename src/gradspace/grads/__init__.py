"""Per-sample gradient engine (closed form, vmap, layer hooks, loop) and parameter
selections; see ``engine.GradientEngine``."""

from .engine import STRATEGIES, GradientEngine
from .losses import LOSSES
from .params import find_head, select_params

__all__ = ["GradientEngine", "select_params", "find_head", "LOSSES", "STRATEGIES"]
