"""Per-sample gradient engine (closed form, vmap, layer hooks, loop), per-sample norm
reductions and parameter selections; see ``engine.GradientEngine``.

Names are resolved lazily so that numpy-only users of ``gradspace.grads.lastlayer``
(the closed-form detectors) do not import torch.
"""

import importlib

_EXPORTS = {
    "GradientEngine": ".engine",
    "GradReductions": ".reduce",
    "NormReducer": ".reduce",
    "STRATEGIES": ".engine",
    "LOSSES": ".losses",
    "find_head": ".params",
    "select_params": ".params",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
