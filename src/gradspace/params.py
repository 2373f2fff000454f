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

import copy
import functools
import json
import os
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path

from .errors import ConfigError

# The workflow's config schema: the one source of every default. A job's ``--params``
# take a key's default from here (``Schema``) when the caller leaves it out.
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


class Schema:
    """A default that is the config schema's default of ``key`` (dotted, e.g.
    ``"compute.batch_size"``); resolved only when a job's params leave the key out."""

    __slots__ = ("key",)

    def __init__(self, key: str):
        self.key = key

    def __repr__(self) -> str:
        return f"Schema({self.key!r})"


@functools.lru_cache(maxsize=1)
def _schema() -> dict:
    import yaml

    if not SCHEMA_PATH.is_file():
        raise ConfigError(f"config schema {SCHEMA_PATH} not found (the defaults of job params come from it)")
    with open(SCHEMA_PATH) as fh:
        return yaml.safe_load(fh)


def schema_default(key: str):
    """The schema's default of the dotted config ``key`` (a copy)."""
    node = _schema()
    for part in key.split("."):
        try:
            node = node["properties"][part]
        except (KeyError, TypeError):
            raise ConfigError(f"config schema {SCHEMA_PATH.name} has no key '{key}'") from None
    if "default" not in node:
        raise ConfigError(f"config schema {SCHEMA_PATH.name}: '{key}' has no default")
    return copy.deepcopy(node["default"])


def merge_params(params: Mapping | None, defaults: Mapping, where: str, required: Iterable[str] = (),
                 optional: Iterable[str] = (), noun: str = "key") -> dict:
    """A job's ``--params`` over its ``defaults``: every command merges its options here.

    Keys outside ``defaults``, ``required`` and ``optional`` are a ConfigError naming
    ``where`` and the known keys; ``required`` keys (values the workflow always passes from
    the config) must be present; ``optional`` ones are kept when given. A default given
    as ``Schema("section.key")`` is the config schema's, so a command never holds a
    second copy of a config default."""
    params = dict(params or {})
    required = tuple(required)
    known = set(defaults) | set(required) | set(optional)
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown {noun}(s) {unknown}; known: {sorted(known)}")
    require(params, *required, where=where)
    def default(v):
        return schema_default(v.key) if isinstance(v, Schema) else copy.deepcopy(v)

    out = {k: params[k] if k in params else default(v) for k, v in defaults.items()}
    out.update(params)  # in the order of {**defaults, **params}
    return out


def require(params: Mapping, *keys: str, where: str = "--params") -> None:
    """ConfigError naming the first of ``keys`` missing from ``params``: for values the
    workflow always passes, so that a command has no second default of its own."""
    missing = [k for k in keys if k not in params]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(repr(k) for k in missing)} "
                          "(the workflow passes them from the config)")


def attempt_scaled(**base) -> dict:
    """A rule's ``resources:`` (e.g. ``mem_mb=8000, runtime=60``) multiplied by the attempt:
    a job that SLURM killed for memory or time gets more on each retry."""
    return {key: (lambda wc, attempt, v=value: v * attempt) for key, value in base.items()}


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
