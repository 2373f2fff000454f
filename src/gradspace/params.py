"""What the workflow hands to a job besides its inputs: the ``--params`` JSON blobs and the
settings exported through the environment.

The library side of the workflow → job handoff, so that library modules (``store``, the
stages' ``cmd_*`` functions) and ``workflow/rules/common.smk`` never import
``gradspace.cli``; ``cli`` imports from here. Standard library only: the workflow's
parse and every array job import this module.

* ``$GRADSPACE_RUNTIME`` (``RUNTIME_ENV``): speed-only compute settings (device, batch size,
  data-loader workers). They change how fast a job runs, not what it writes, so they are
  not rule params and changing them reruns nothing. The workflow exports them with
  ``export_runtime_settings``; the CLI fills them into a command's JSON options with
  ``merge_runtime_settings``.
* ``$GRADSPACE_SHARDS`` (``SHARDS_ENV``): the shard count the config asks for each dataset,
  read by the jobs' layout checks (``expected_shards``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, MutableMapping

from .errors import ConfigError


def require(params: Mapping, *keys: str, where: str = "--params") -> None:
    """ConfigError naming the first of ``keys`` missing from ``params``: for values the
    workflow always passes, so that a command has no second default of its own."""
    missing = [k for k in keys if k not in params]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(repr(k) for k in missing)} "
                          "(the workflow passes them from the config)")


RUNTIME_ENV = "GRADSPACE_RUNTIME"
RUNTIME_KEYS = ("device", "batch_size", "num_workers")


def runtime_settings(compute: Mapping) -> dict:
    """The speed-only keys of a ``compute`` config section."""
    return {k: compute[k] for k in RUNTIME_KEYS if k in compute}


def export_runtime_settings(compute: Mapping, environ: MutableMapping | None = None) -> None:
    """Put the speed-only compute settings into $GRADSPACE_RUNTIME (called by the workflow)."""
    env = os.environ if environ is None else environ
    env[RUNTIME_ENV] = json.dumps(runtime_settings(compute), sort_keys=True)


def read_runtime_settings(environ: Mapping | None = None) -> dict:
    """The settings in $GRADSPACE_RUNTIME ({} when unset); ConfigError when not a JSON object."""
    raw = (os.environ if environ is None else environ).get(RUNTIME_ENV)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"${RUNTIME_ENV} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"${RUNTIME_ENV} must be a JSON object, got {raw!r}")
    return value


def merge_runtime_settings(targets: Iterable[MutableMapping], runtime: Mapping) -> None:
    """Fill the runtime keys into each target dict; values already there win."""
    for value in targets:
        for key in RUNTIME_KEYS:
            if key in runtime and key not in value:
                value[key] = runtime[key]


SHARDS_ENV = "GRADSPACE_SHARDS"


def expected_shards(dataset: str, environ: Mapping | None = None) -> int | None:
    """The shard count the workflow's config asks for ``dataset`` ($GRADSPACE_SHARDS, a JSON
    object {dataset: shards} exported by the workflow), or None outside the workflow."""
    raw = (os.environ if environ is None else environ).get(SHARDS_ENV)
    if not raw:
        return None
    try:
        value = json.loads(raw).get(dataset)
    except (ValueError, AttributeError):
        return None
    return None if value is None else int(value)
