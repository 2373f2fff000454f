"""Parameter layout and parameter blocks of the gradient subspace.

The flattened gradient ∇θE ∈ R^P follows the parameter order of
``gradspace.grads.select_params`` (the model's ``named_parameters()`` order). The subspace
V ∈ R^{P×K} is split into *parameter blocks*: named groups of parameters, each stored as
its own P_b×K array, so that products and projections can run block by block and V never
has to fit on one device (ResNet-50 at K = 1000 is 102 GB in fp32). Every product with V
is a sum over blocks: G·V = Σ_b G_b·V_b, and Gᵀ·U splits into the rows Gᵀ_b·U.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, NumericalError


def resolve_params(model, spec="all") -> dict:
    """``{name: Parameter}`` for a parameter selection, through ``gradspace.grads.select_params``
    (the same selection the gradient engine uses, so the layouts agree)."""
    from ..grads.params import select_params

    return select_params(model, spec)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "block"


@dataclass
class ParamLayout:
    """Names/shapes of the selected parameters and their grouping into blocks.

    ``offsets[i]`` is where parameter i starts in the flat gradient (engine order);
    ``blocks`` is an ordered list of (block name, [parameter indices])."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    blocks: list[tuple[str, list[int]]]
    sizes: list[int] = field(init=False)
    offsets: list[int] = field(init=False)

    def __post_init__(self):
        self.shapes = [tuple(int(s) for s in sh) for sh in self.shapes]
        self.sizes = [int(np.prod(sh, dtype=np.int64)) for sh in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int).tolist()[:-1]
        seen = [i for _, idx in self.blocks for i in idx]
        if sorted(seen) != list(range(len(self.names))):
            raise ConfigError("parameter blocks must cover every selected parameter exactly once")
        bnames = [b for b, _ in self.blocks]
        if len(set(bnames)) != len(bnames):
            raise ConfigError(f"duplicate parameter block names {bnames}")

    # -- sizes ------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        return int(sum(self.sizes))

    @property
    def block_names(self) -> list[str]:
        return [b for b, _ in self.blocks]

    def block_params(self, block: str) -> list[int]:
        for b, idx in self.blocks:
            if b == block:
                return idx
        raise ConfigError(f"unknown parameter block '{block}'; blocks: {', '.join(self.block_names)}")

    def block_size(self, block: str) -> int:
        return int(sum(self.sizes[i] for i in self.block_params(block)))

    def block_ranges(self, block: str) -> list[tuple[int, int]]:
        """Flat (start, stop) ranges of the block's parameters in engine order (adjacent merged)."""
        out: list[tuple[int, int]] = []
        for i in self.block_params(block):
            a, z = self.offsets[i], self.offsets[i] + self.sizes[i]
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], z)
            else:
                out.append((a, z))
        return out

    def check_blocks(self, blocks) -> list[str]:
        if blocks is None or blocks == "all":
            return self.block_names
        if isinstance(blocks, str):
            blocks = [b for b in blocks.split(",") if b]
        for b in blocks:
            self.block_params(b)
        return list(blocks)

    def select_blocks(self, blocks=None, group: Mapping | None = None) -> list[str]:
        """The blocks one job works on: ``blocks`` (names, comma-separated or a list; a
        name may omit the ``NN_`` prefix) or ``group`` = {"groups": n | {name: [blocks]},
        "group": index | name} (one group of :meth:`block_groups`); default all."""
        if group:
            groups = self.block_groups(group.get("groups", 1))
            key = str(group.get("group"))
            if key not in groups:
                raise ConfigError(f"unknown parameter block group {key!r}; groups: {', '.join(groups)}")
            return groups[key]
        if isinstance(blocks, str) and blocks != "all":
            blocks = [b for b in blocks.split(",") if b]
        if blocks is None or blocks == "all":
            return self.block_names
        return [self._block_name(b) for b in blocks]

    def _block_name(self, name: str) -> str:
        if name in self.block_names:
            return name
        short = [b for b in self.block_names if re.sub(r"^\d+_", "", b) == name]
        if len(short) == 1:
            return short[0]
        raise ConfigError(f"unknown parameter block '{name}'; blocks: {', '.join(self.block_names)}")

    def block_groups(self, spec) -> dict[str, list[str]]:
        """Parameter blocks grouped into jobs (``subspace.block_jobs``).

        An integer n splits the blocks, in layout order, into n contiguous groups named
        ``"0"``..``"n-1"`` whose largest parameter count is as small as possible (V_b, the
        memory of a job, is proportional to it). A mapping {group name: [block names]}
        names the groups; it must cover every block exactly once."""
        names = self.block_names
        if isinstance(spec, Mapping):
            out = {str(g): [self._block_name(b) for b in bs] for g, bs in spec.items()}
            flat = [b for bs in out.values() for b in bs]
            missing = [b for b in names if b not in flat]
            dup = sorted({b for b in flat if flat.count(b) > 1})
            if missing or dup or any(not bs for bs in out.values()):
                raise ConfigError(f"subspace.block_jobs: the groups must cover every parameter block "
                                  f"exactly once (missing: {missing}, repeated: {dup}, blocks: "
                                  f"{', '.join(names)})")
            return {g: [b for b in names if b in bs] for g, bs in out.items()}  # layout order
        n = int(spec)
        if n < 1:
            raise ConfigError(f"subspace.block_jobs must be >= 1, got {n}")
        if n > len(names):
            raise ConfigError(f"subspace.block_jobs = {n} exceeds the {len(names)} parameter blocks "
                              f"({', '.join(names)}); use finer subspace.blocks (e.g. max_params)")
        cuts = _min_max_partition([self.block_size(b) for b in names], n)
        return {str(j): names[a:z] for j, (a, z) in enumerate(zip(cuts[:-1], cuts[1:], strict=True))}

    def subset(self, blocks) -> ParamLayout:
        """The layout of only ``blocks``' parameters (engine order kept), e.g. the flat
        gradient of a block-group job that differentiates just its own parameters."""
        blocks = self.check_blocks(blocks)
        idx = sorted(i for b in blocks for i in self.block_params(b))
        pos = {i: j for j, i in enumerate(idx)}
        return ParamLayout([self.names[i] for i in idx], [self.shapes[i] for i in idx],
                           [(b, [pos[i] for i in self.block_params(b)]) for b in blocks])

    def gather(self, flat, sub: ParamLayout):
        """Entries of a flat P-vector (numpy) belonging to the parameters of ``sub``."""
        where = {n: i for i, n in enumerate(self.names)}
        return np.concatenate([flat[..., self.offsets[where[n]]:self.offsets[where[n]] + self.sizes[where[n]]]
                               for n in sub.names], axis=-1)

    # -- flat vectors -----------------------------------------------------------------
    def take(self, flat, block: str):
        """Rows (or last-axis entries) of a flat P-vector / N×P matrix belonging to ``block``."""
        parts = [flat[..., a:b] for a, b in self.block_ranges(block)]
        if len(parts) == 1:
            return parts[0]
        try:
            import torch

            if isinstance(flat, torch.Tensor):
                return torch.cat(parts, dim=-1)
        except ImportError:  # pragma: no cover
            pass
        return np.concatenate(parts, axis=-1)

    def locate(self, block: str, row: int) -> str:
        """Human-readable position of row ``row`` of block ``block``: 'param[idx]'."""
        for i in self.block_params(block):
            if row < self.sizes[i]:
                idx = np.unravel_index(row, self.shapes[i]) if self.shapes[i] else ()
                return f"{self.names[i]}{list(int(j) for j in idx)}"
            row -= self.sizes[i]
        return f"{block}[{row}]"

    def locate_flat(self, pos: int) -> str:
        for i, (o, s) in enumerate(zip(self.offsets, self.sizes, strict=True)):
            if o <= pos < o + s:
                idx = np.unravel_index(pos - o, self.shapes[i]) if self.shapes[i] else ()
                return f"{self.names[i]}{list(int(j) for j in idx)}"
        return f"flat[{pos}]"

    def check_finite(self, what: str, flat: np.ndarray, where: str = "") -> None:
        """Raise NumericalError naming the first parameter (and element) with NaN/inf."""
        flat = np.asarray(flat)
        bad = ~np.isfinite(flat)
        if bad.any():
            pos = int(np.argwhere(bad.reshape(bad.shape[0], -1) if bad.ndim > 1 else bad)[0][-1])
            raise NumericalError(
                f"{what}{' in ' + where if where else ''}: {int(bad.sum())} non-finite value(s), "
                f"first at parameter {self.locate_flat(pos)}")

    # -- (de)serialization ------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"names": self.names, "shapes": [list(s) for s in self.shapes],
                "blocks": [[b, idx] for b, idx in self.blocks]}

    @classmethod
    def from_dict(cls, d: Mapping) -> ParamLayout:
        return cls(list(d["names"]), [tuple(s) for s in d["shapes"]],
                   [(b, list(idx)) for b, idx in d["blocks"]])

    def same_as(self, other: ParamLayout, where: str = "") -> None:
        if self.names != other.names or self.shapes != other.shapes or self.blocks != other.blocks:
            raise ConfigError(f"parameter layout mismatch{' (' + where + ')' if where else ''}: "
                              "the inputs were computed for different parameter selections or blocks")


def _min_max_partition(sizes: list[int], n: int) -> list[int]:
    """Cut points 0 = c_0 < c_1 < … < c_n = len(sizes) of the contiguous partition into n
    non-empty parts with the smallest largest part sum (dynamic programme; ties go to
    the earliest cut, so the result is deterministic)."""
    m = len(sizes)
    pre = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    inf = float("inf")
    best = [[inf] * (m + 1) for _ in range(n + 1)]
    arg = [[0] * (m + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for j in range(1, n + 1):
        for i in range(j, m - (n - j) + 1):
            for c in range(j - 1, i):
                v = max(best[j - 1][c], int(pre[i] - pre[c]))
                if v < best[j][i]:
                    best[j][i], arg[j][i] = v, c
    cuts, i = [m], m
    for j in range(n, 0, -1):
        i = arg[j][i]
        cuts.append(i)
    return cuts[::-1]


def build_layout(model, params="all", blocks="stages") -> ParamLayout:
    """Select parameters and group them into blocks.

    ``blocks``: ``"single"`` (one block), ``"stages"`` (the model's named stages plus
    ``head``; falls back to ``"top"`` for models without stages), ``"top"`` (first
    component of the parameter name, after a wrapper's ``net.`` prefix),
    ``{"max_params": n}`` (consecutive parameters grouped up to n entries per block, a byte
    budget of 4·n·K bytes for V), or ``{"blocks": {name: [name prefixes]}}``."""
    sel = resolve_params(model, params)
    names = list(sel)
    shapes = [tuple(p.shape) for p in sel.values()]
    return ParamLayout(names, shapes, group_blocks(model, names, shapes, blocks))


def group_blocks(model, names, shapes, spec) -> list[tuple[str, list[int]]]:
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    groups: dict[str, list[int]] = {}
    if spec in (None, "single"):
        return [("all", list(range(len(names))))]
    if spec == "stages" and hasattr(model, "stage_names") and hasattr(model, "stage_parameters"):
        owner = {}
        for st in model.stage_names:
            for pname in model.stage_parameters(st):
                owner.setdefault(pname, st)
        if hasattr(model, "head_parameters"):
            for pname in model.head_parameters():
                owner.setdefault(pname, "head")
        for i, n in enumerate(names):
            groups.setdefault(owner.get(n, "other"), []).append(i)
    elif spec in ("stages", "top"):
        for i, n in enumerate(names):
            parts = n.split(".")
            if parts[0] == "net" and len(parts) > 2:
                parts = parts[1:]
            groups.setdefault(parts[0] if len(parts) > 1 else "params", []).append(i)
    elif isinstance(spec, Mapping) and "max_params" in spec:
        budget = int(spec["max_params"])
        if budget <= 0:
            raise ConfigError(f"subspace.blocks.max_params must be positive, got {budget}")
        cur, total, k = [], 0, 0
        for i, s in enumerate(sizes):
            if cur and total + s > budget:
                groups[f"part{k:03d}"] = cur
                cur, total, k = [], 0, k + 1
            cur.append(i)
            total += s
        if cur:
            groups[f"part{k:03d}"] = cur
    elif isinstance(spec, Mapping) and "blocks" in spec:
        for bname, prefixes in dict(spec["blocks"]).items():
            groups[bname] = [i for i, n in enumerate(names)
                             if any(n == p or n.startswith(p + ".") for p in prefixes)]
        covered = [i for v in groups.values() for i in v]
        missing = [names[i] for i in range(len(names)) if i not in covered]
        if missing or len(covered) != len(set(covered)):
            raise ConfigError(f"subspace.blocks: explicit blocks must cover every parameter once "
                              f"(uncovered: {missing[:5]})")
    else:
        raise ConfigError(f"subspace.blocks: unknown block spec {spec!r}; expected 'single', 'stages', "
                          "'top', {'max_params': n} or {'blocks': {name: [prefixes]}}")
    out = []
    for j, (b, idx) in enumerate(groups.items()):
        if idx:
            out.append((f"{j:02d}_{_safe(b)}", sorted(idx)))
    return out
