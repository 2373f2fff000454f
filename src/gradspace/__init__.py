"""gradspace: gradient-based out-of-distribution detection at scale.

The Python API (``gradspace.api``, documented in the README's "From Python" section) is
available from the package itself: ``gradspace.detector``, ``gradspace.fit_subspace``,
``gradspace.open_run``, ... It is imported on first use, so the workflow's job processes
(``gradspace <command>``) do not pay for it.
"""

__version__ = "0.1.0"

_API = (
    "Detector",
    "FitContext",
    "Run",
    "Subspace",
    "detector",
    "list_detectors",
    "fit_subspace",
    "gradient_engine",
    "ood_metrics",
    "open_run",
    "per_sample_gradients",
)


def __getattr__(name):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'gradspace' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
