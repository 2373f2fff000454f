"""Parameter selections for per-sample gradients.

A selection names the parameters whose gradient the engine returns, in the model's
``named_parameters()`` order (which fixes the layout of the flattened gradient):

- ``"last"``        the last linear layer (the classifier head): weight and bias;
- ``"last_weight"`` the head's weight only (GradNorm's default, Huang et al. 2021 §4.2);
- ``"all"``         every parameter of the network ("Deep" in Igoe et al. 2022);
- a list of stage names (``model.stage_names``, e.g. ``["layer4"]``) or module names, or
  ``{"blocks": [...]}``: every parameter of those stages/modules ("block n" in GradNorm's
  Table 2). Stages resolve through ``model.stage_parameters`` when the model has it;
- ``{"names": [...]}``: exactly these qualified parameter names (the subspace stage's
  block-group jobs, which differentiate only their own parameters).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError

SPECS = ("last", "last_weight", "all")


def find_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier head: ``model.head`` when it is an ``nn.Linear`` (the gradspace model
    API), otherwise the last ``nn.Linear`` registered in the module tree."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        for name, mod in model.named_modules():
            if mod is head:
                return name, head
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = (name, mod)
    if last is None:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear head; parameter selection "
                          "'last'/'last_weight' needs one")
    return last


def _module_prefixes(model: nn.Module, stage: str) -> list[str]:
    """Qualified module names matching a stage name: exact, or ending with '.<stage>'
    (the gradspace wrapper may nest the network, e.g. 'net.layer4')."""
    names = [n for n, _ in model.named_modules() if n]
    exact = [n for n in names if n == stage]
    if exact:
        return exact
    nested = [n for n in names if n.endswith("." + stage)]
    if nested:
        depth = min(n.count(".") for n in nested)
        return [n for n in nested if n.count(".") == depth]
    return []


def select_params(model: nn.Module, spec) -> dict[str, nn.Parameter]:
    """Return ``{qualified name: Parameter}`` for a selection spec (see module docstring).

    Raises ConfigError naming the spec when it selects nothing or is malformed."""
    named = list(model.named_parameters())
    if isinstance(spec, str) and spec in SPECS:
        if spec == "all":
            sel = dict(named)
        else:
            head_name, head = find_head(model)
            wanted = {id(head.weight)}
            if spec == "last" and head.bias is not None:
                wanted.add(id(head.bias))
            sel = {n: p for n, p in named if id(p) in wanted}
            if not sel:  # head parameters not reachable by name (should not happen)
                raise ConfigError(f"parameter selection '{spec}': head '{head_name}' not found")
        return sel
    if isinstance(spec, Mapping) and set(spec) == {"names"}:
        wanted = list(spec["names"])
        have = dict(named)
        unknown = [n for n in wanted if n not in have]
        if unknown or not wanted:
            raise ConfigError(f"parameter selection by name: {unknown or 'no names'} not among "
                              f"the parameters of {type(model).__name__}")
        return {n: p for n, p in named if n in set(wanted)}
    if isinstance(spec, Mapping):
        if set(spec) != {"blocks"}:
            raise ConfigError(f"parameter selection {dict(spec)!r}: expected {{'blocks': [names]}} "
                              "or {'names': [parameter names]}")
        spec = spec["blocks"]
    if isinstance(spec, str):
        spec = [spec]
    if not isinstance(spec, Sequence) or not spec or not all(isinstance(s, str) for s in spec):
        raise ConfigError(f"parameter selection {spec!r}: expected one of {SPECS}, a list of "
                          "stage names or {'blocks': [...]}")
    prefixes: list[str] = []
    by_stage: set[int] = set()
    stage_names = list(getattr(model, "stage_names", None) or [])
    for stage in spec:
        if stage in stage_names and callable(getattr(model, "stage_parameters", None)):
            # gradspace wrapper: a stage owns the parameters of its modules
            by_stage.update(id(p) for p in model.stage_parameters(stage).values())
            continue
        found = _module_prefixes(model, stage)
        if not found:
            stages = getattr(model, "stage_names", None) or [n for n, _ in model.named_children()]
            raise ConfigError(f"parameter selection: no module named '{stage}' in "
                              f"{type(model).__name__} (stages: {list(stages)})")
        prefixes.extend(found)
    sel = {n: p for n, p in named
           if id(p) in by_stage or any(n.startswith(pre + ".") for pre in prefixes)}
    if not sel:
        raise ConfigError(f"parameter selection {list(spec)}: the named modules have no parameters")
    return sel


def is_head_only(model: nn.Module, selected: Mapping[str, torch.Tensor]) -> bool:
    """True when every selected parameter belongs to the head (closed form applies)."""
    try:
        _, head = find_head(model)
    except ConfigError:
        return False
    ids = {id(head.weight)} | ({id(head.bias)} if head.bias is not None else set())
    return all(id(p) in ids for p in selected.values())
