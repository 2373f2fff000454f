"""OOD detectors: one module per method, all registered in ``base``'s registry."""

import importlib

BUILTIN_MODULES = [
    "msp", "maxlogit", "energy", "odin", "react", "bats", "mahalanobis", "knn", "vim",
    # gradient-norm scores (issue 3)
    "gradnorm", "igoe", "grood",
    # detectors on reduced gradients (low-dimensional gradient paper), with their parse-time checks
    "gradient",
]

_loaded = False


def load_builtin() -> None:
    """Import every built-in detector module so it registers itself."""
    global _loaded
    if _loaded:
        return
    for name in BUILTIN_MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    _loaded = True
