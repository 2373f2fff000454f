"""Layering of the package (issue 11, "Library first"): the library never imports the CLI,
and the module import graph has no cycles but the known ones.

The graph is built from the source with ``ast`` (module-level and function-local imports
alike, so a lazy import that only hides a cycle still counts); nothing is imported.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "gradspace"
ROOT = PKG.parents[1]

# Modules that still import gradspace.cli; each entry is a to-do, not a permission. The test
# fails when one of them no longer does (then remove it here) and on any other module.
KNOWN_CLI_IMPORTS: set[str] = set()

# Import cycles (strongly connected components) present when this test was written, each
# a to-do. Any other cycle, or a larger component, fails the test; so does an entry here
# that is no longer a cycle (remove it).
KNOWN_CYCLES: set[frozenset] = set()


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mods[".".join(parts)] = (path, is_pkg)
    return mods


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The gradspace module that ``name`` (a module or an attribute path) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """The gradspace modules that ``module`` imports anywhere in its source."""
    path, is_pkg = MODULES[module]
    package = module if is_pkg else module.rpartition(".")[0]
    deps: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            deps.update(_owner(a.name) for a in node.names if a.name.split(".")[0] == "gradspace")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                full = ".".join(base + ([node.module] if node.module else []))
            else:
                full = node.module or ""
            if full.split(".")[0] != "gradspace":
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{full}.{alias.name}"
                deps.add(sub if sub in MODULES else _owner(full))
    deps.discard(None)
    deps.discard(module)
    return deps  # type: ignore[return-value]


GRAPH = {m: imports_of(m) for m in MODULES}


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.add(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(comp)
    return out


def test_graph_sees_function_local_and_relative_imports():
    # store.open_store is imported inside a function of data.manifest; cli imports params.
    assert "gradspace.store" in GRAPH["gradspace.data.manifest"]
    assert "gradspace.params" in GRAPH["gradspace.cli"]
    assert "gradspace.metrics" in GRAPH["gradspace.cli.metrics"]
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def _is_cli(module: str) -> bool:
    return module == "gradspace.cli" or module.startswith("gradspace.cli.")


def test_library_never_imports_the_cli():
    importers = {m for m, deps in GRAPH.items() if not _is_cli(m) and any(map(_is_cli, deps))}
    new = importers - KNOWN_CLI_IMPORTS
    assert not new, (f"library modules import gradspace.cli: {sorted(new)}; import "
                     "export_runtime_settings etc. from gradspace.params instead")
    fixed = KNOWN_CLI_IMPORTS - importers
    assert not fixed, f"no longer import gradspace.cli, remove from KNOWN_CLI_IMPORTS: {sorted(fixed)}"


def test_argument_parsing_lives_only_in_the_cli_package():
    """No library module defines a ``register`` for argparse or imports argparse: every
    command's parser is in ``gradspace.cli.<stage>``, which calls into the library."""
    offenders = []
    for module, (path, _) in MODULES.items():
        if _is_cli(module):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names):
                offenders.append(f"{module} imports argparse")
            elif isinstance(node, ast.ImportFrom) and node.module == "argparse":
                offenders.append(f"{module} imports from argparse")
            elif isinstance(node, ast.FunctionDef) and node.name == "register":
                offenders.append(f"{module} defines register()")
    assert not offenders, offenders
    from gradspace.cli import COMMAND_MODULES

    assert all(m.startswith("gradspace.cli.") and m in MODULES for m in COMMAND_MODULES)


def test_workflow_never_imports_the_cli():
    for path in [ROOT / "Snakefile", *sorted((ROOT / "workflow").rglob("*.smk"))]:
        text = path.read_text()
        assert "gradspace.cli" not in text and "gradspace import cli" not in text, path


def test_no_new_import_cycles():
    cycles = {frozenset(c) for c in strongly_connected(GRAPH)}
    new = cycles - KNOWN_CYCLES
    assert not new, "new import cycle(s) among gradspace modules: " + "; ".join(
        " <-> ".join(sorted(c)) for c in new)
    gone = KNOWN_CYCLES - cycles
    assert not gone, "known cycle(s) broken, remove from KNOWN_CYCLES: " + "; ".join(
        " <-> ".join(sorted(c)) for c in gone)


def test_params_module_is_light():
    """gradspace.params is imported by the workflow's parse and every job: stdlib only."""
    assert GRAPH["gradspace.params"] <= {"gradspace.errors"}
    code = ("import sys, gradspace.params; "
            "bad = [m for m in ('numpy', 'torch', 'zarr', 'gradspace.cli') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    env = {**os.environ, "PYTHONPATH": str(PKG.parent)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr


def test_importing_the_library_leaves_cli_unloaded():
    """In a fresh interpreter, importing every library module loads no gradspace.cli
    module; building the whole parser then registers every command."""
    from gradspace.cli import COMMANDS

    mods = sorted(m for m in MODULES if not _is_cli(m) and m not in KNOWN_CLI_IMPORTS)
    code = f"""
import importlib, sys
for m in {mods!r}:
    try:
        importlib.import_module(m)
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("gradspace"):
            continue  # optional dependency missing here
        raise
loaded = [m for m in sys.modules if m == "gradspace.cli" or m.startswith("gradspace.cli.")]
if loaded:
    sys.exit("importing the library loaded " + ", ".join(loaded))
from gradspace.cli import build_parser
sub = build_parser()._subparsers._group_actions[0]
print(" ".join(sorted(sub.choices)))
"""
    env = {**os.environ, "PYTHONPATH": str(PKG.parent)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == sorted(COMMANDS)


def test_manifest_shards_env_matches_params(monkeypatch):
    """data.manifest re-exports the $GRADSPACE_SHARDS reader of gradspace.params (one
    reader for the workflow, store and manifest); both names must agree."""
    from gradspace import params
    from gradspace.data import manifest

    assert manifest.SHARDS_ENV == params.SHARDS_ENV
    monkeypatch.setenv(params.SHARDS_ENV, '{"id_train": 3}')
    for ds in ("id_train", "other"):
        assert manifest.expected_shards(ds) == params.expected_shards(ds)
    assert params.expected_shards("id_train") == 3
