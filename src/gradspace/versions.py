"""Code versions of the workflow's stages: the rerun policy for code changes.

Snakemake reruns a job when its rule's ``params`` change. Every rule passes the version
of the package stage it runs (``code=...``), so a change to the package that alters a
stage's outputs is shipped together with a bump of that stage's number here: the next
run reruns exactly that stage and everything downstream of it, and nothing else. Changes
that do not alter outputs (speed, messages, refactoring) keep the number.

``$GRADSPACE_CODE_VERSIONS`` (a JSON object, e.g. ``{"extract": 2}``) overrides entries,
to force a stage to rerun without editing the package.
"""

from __future__ import annotations

import json
import os

from .errors import ConfigError

STAGE_VERSIONS = {
    "prepare": 1,
    "model": 1,
    "extract": 1,
    "gradients": 3,  # 2: norms from per-tensor reductions; 3: deep BatchGrad oriented as −S
    "detectors": 2,  # 2: shallow BatchGrad oriented as −S (labels drawn from p, like ExGrad)
    "subspace": 2,
    "project": 1,
    "evaluate": 1,
    "findings": 1,
    "selection": 1,
    "report": 1,
}


def code_version(stage: str) -> str:
    """``<stage>-v<N>`` for the rule params; unknown stages are a ConfigError."""
    versions = dict(STAGE_VERSIONS)
    raw = os.environ.get("GRADSPACE_CODE_VERSIONS")
    if raw:
        try:
            versions.update({str(k): int(v) for k, v in json.loads(raw).items()})
        except (ValueError, AttributeError, TypeError) as exc:
            raise ConfigError(f"$GRADSPACE_CODE_VERSIONS is not a JSON object of integers: {raw!r}") from exc
    if stage not in versions:
        raise ConfigError(f"unknown workflow stage '{stage}' (known: {sorted(versions)})")
    return f"{stage}-v{versions[stage]}"
