"""The ``gradspace`` command line. Snakemake rules call these subcommands.

Each module in COMMAND_MODULES exposes ``register(subparsers)`` that adds its
subcommands and sets ``func`` on the parser. GradspaceError becomes a one-line
``error:`` message and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from .errors import GradspaceError

# The library side of the workflow handoff lives in gradspace.params (library modules and
# the workflow import it from there, never from this module); re-exported for callers.
from .params import (  # noqa: F401
    RUNTIME_ENV,
    RUNTIME_KEYS,
    export_runtime_settings,
    json_arg,
    merge_runtime_settings,
    read_runtime_settings,
)

COMMAND_MODULES = [
    "gradspace.data.prepare",
    "gradspace.models.commands",
    "gradspace.extract",
    "gradspace.detectors.commands",
    "gradspace.metrics",
    "gradspace.findings",
    "gradspace.report",
    "gradspace.grads.commands",
    "gradspace.subspace.commands",
    "gradspace.timing",
    "gradspace.verify",
    "gradspace.plan",
]

# Which module registers each subcommand, so that a job imports only what it runs
# (an array-detector `score` job must not pay for importing torch). A test checks that
# this table matches what the modules register.
COMMANDS = {
    "prepare": "gradspace.data.prepare",
    "train": "gradspace.models.commands",
    "load-model": "gradspace.models.commands",
    "model-card": "gradspace.models.commands",
    "extract": "gradspace.extract",
    "fit": "gradspace.detectors.commands",
    "score": "gradspace.detectors.commands",
    "evaluate": "gradspace.metrics",
    "findings": "gradspace.findings",
    "report": "gradspace.report",
    "grad-scores": "gradspace.grads.commands",
    "timing-tables": "gradspace.timing",
    "verify-stores": "gradspace.verify",
    "plan": "gradspace.plan",
    **{name: "gradspace.subspace.commands" for name in (
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
    from . import __version__

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
        from .runtime import peak_memory_line

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
