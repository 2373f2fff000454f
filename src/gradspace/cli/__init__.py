"""The ``gradspace`` command line. Snakemake rules call these subcommands.

This package holds the argument parsing and nothing else: each module in COMMAND_MODULES
(one per stage) exposes ``register(subparsers)``, which adds its subcommands and sets
``func`` to the library function the command runs (``cmd_*`` in the stage's library
module: it reads the parsed arguments and calls the stage's functions). The library
never imports this package. GradspaceError becomes a one-line ``error:`` message and
exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys

from ..errors import GradspaceError

# The library side of the workflow handoff lives in gradspace.params (the workflow imports
# it from there, never from this package); re-exported for callers.
from ..params import (  # noqa: F401
    RUNTIME_ENV,
    RUNTIME_KEYS,
    export_runtime_settings,
    merge_runtime_settings,
    read_runtime_settings,
)

COMMAND_MODULES = [
    "gradspace.cli.prepare",
    "gradspace.cli.models",
    "gradspace.cli.extract",
    "gradspace.cli.detectors",
    "gradspace.cli.metrics",
    "gradspace.cli.findings",
    "gradspace.cli.selection",
    "gradspace.cli.report",
    "gradspace.cli.grads",
    "gradspace.cli.subspace",
    "gradspace.cli.timing",
    "gradspace.cli.verify",
    "gradspace.cli.plan",
]


def json_arg(text: str) -> dict:
    """argparse type for --params / --compute: a JSON object."""
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


# Which module registers each subcommand, so that a job imports only what it runs
# (an array-detector `score` job must not pay for importing torch). A test checks that
# this table matches what the modules register.
COMMANDS = {
    "prepare": "gradspace.cli.prepare",
    "train": "gradspace.cli.models",
    "load-model": "gradspace.cli.models",
    "model-card": "gradspace.cli.models",
    "extract": "gradspace.cli.extract",
    "fit": "gradspace.cli.detectors",
    "score": "gradspace.cli.detectors",
    "evaluate": "gradspace.cli.metrics",
    "findings": "gradspace.cli.findings",
    **{name: "gradspace.cli.selection" for name in (
        "select", "select-alpha", "check-validation", "selection-table")},
    "report": "gradspace.cli.report",
    "grad-scores": "gradspace.cli.grads",
    "timing-tables": "gradspace.cli.timing",
    "verify-stores": "gradspace.cli.verify",
    "plan": "gradspace.cli.plan",
    **{name: "gradspace.cli.subspace" for name in (
        "gradstats-partial", "gradstats-reduce", "ag-partial", "ag-reduce", "pca-init",
        "pca-pass", "pca-gv", "pca-reduce", "pca-diagnostics", "pca-settings", "pca-lift", "pca-finalize",
        "pca-solver", "pca-exact",
        "project", "project-merge",
        "subspace-diagnostics", "gradient-diagnostics", "ensemble-scores")},
}


def _merge_runtime_settings(args) -> None:
    """Fill device/batch_size/num_workers into --params/--compute from $GRADSPACE_RUNTIME.

    These settings change how fast a job runs, not what it writes, so the workflow
    hands them over through the environment rather than as rule params: changing them
    must not make Snakemake rerun finished jobs (``gradspace.params``). Explicit values
    on the command line win. A subcommand names the options that take them with
    ``parser.set_defaults(runtime_into=("params",))``; the default is ``--compute``.
    """
    runtime = read_runtime_settings()
    if runtime:
        targets = (getattr(args, attr, None) for attr in getattr(args, "runtime_into", ("compute",)))
        merge_runtime_settings([t for t in targets if isinstance(t, dict)], runtime)


def build_parser(modules: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``modules`` limits which command modules are imported."""
    from .. import __version__

    parser = argparse.ArgumentParser(prog="gradspace", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"gradspace {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for mod in modules or COMMAND_MODULES:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name == mod:
                continue  # stage not built in this checkout
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser([COMMANDS[command]] if command in COMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threads = os.environ.get("GRADSPACE_THREADS")
    if threads:  # read by torch/numpy when (and if) they are imported
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = threads
    try:
        _merge_runtime_settings(args)
        args.func(args)
        from ..runtime import peak_memory_line

        line = peak_memory_line()
        if line:  # for sizing mem_mb; Snakemake's sampled max_rss misses short peaks
            print(line, file=sys.stderr)
    except GradspaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        if "checksum" not in str(exc).lower():
            raise
        # Zarr's crc32c codec: a chunk of some store read by this command was corrupted
        # (bit flips, overwritten bytes); never use what it decoded.
        print(f"error: a Zarr chunk failed its checksum ({exc}): a store this command read is "
              "corrupt; run `gradspace verify-stores results/<experiment> --remove` to find and "
              "remove it, then snakemake again to rebuild it", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
