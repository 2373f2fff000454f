"""``gradspace grad-scores``: gradient-norm scores that need a model pass (block, deep /
all-parameter variants), computed per shard with the per-sample gradient engine and
written to a Zarr store (one float64 array per score, plus ``index`` and ``labels``).

Score kinds (``--params`` → "scores": {name: spec}); p = softmax(f/T), g_y = ∇_θ(−log p_y)
over the selected parameters θ (``params``):

- ``{"kind": "gradnorm", "p": 1, "target": "uniform"}``: ‖∇_θ KL(u ‖ p)‖_p (GradNorm,
  Huang et al. 2021, eq. 5, Table 2's block/all variants); ``target: "onehot"`` gives
  −‖∇_θ CE(f, ŷ)‖_p (eq. 7). One backward pass.
- ``{"kind": "igoe", "order": "exp_norm"|"norm_exp", "dist": "pred"|"uniform",
  "norm": "l1"|"l2sq", "weight": "none"|"logp_over_p", "samples": null|K}``: Igoe et al.
  (2022) Table 1 "Deep" rows: E_{Y~q}[w(Y)‖∇ log p^(Y)‖] (exp_norm; ExGrad is pred/l1)
  or ‖E_{Y~q}[∇ log p^(Y)]‖ (norm_exp). Exact expectations take C backward passes
  (one per label) shared by all exp_norm scores; ``samples: K`` draws K labels per sample
  (seeded per sample) instead.
- ``{"kind": "batchgrad"}``: deep BatchGrad (Igoe et al. eq. 6),
  E_{Y~p}[‖∇_θ(log p^(Y)(x) + Σ_i log p^(y_i)(x_i^ID))‖₁] with one ID-train point per
  class from ``--ref-data-dir`` (first of each class in a seeded shuffle).

Every score is a norm of per-sample gradients (of g, or of g + c for BatchGrad), so the
scorer uses the engine's reduction path (``GradientEngine.reduce``): each parameter
tensor's per-sample gradient is reduced to Σ|g|^p as soon as it exists, and the N×P
gradient matrix is never formed. Memory is bounded by the engine's chunk (the hooks
strategy: one layer's chunk_size × numel floats; the loop: one sample), never by the
number of samples.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..detectors.igoe import orientation
from ..errors import ConfigError, DataError
from ..params import Schema, merge_params

log = logging.getLogger(__name__)

DEFAULTS = {
    "params": Schema("gradients.params"),
    "temperature": Schema("gradients.temperature"),
    "strategy": Schema("gradients.strategy"),
    "chunk_size": Schema("gradients.chunk_size"),
    "precision": Schema("compute.precision"),
    "max_chunk_mb": None,
    "device": Schema("compute.device"),
    "batch_size": Schema("compute.batch_size"),
    "num_workers": Schema("compute.num_workers"),
    "mean": None,
    "std": None,
    "seed": Schema("seed"),
    "scores": Schema("gradients.scores"),
}
SCORE_KEYS = {
    "gradnorm": {"p": 1.0, "target": "uniform"},
    "igoe": {"order": "exp_norm", "dist": "pred", "norm": "l1", "weight": "none", "samples": None},
    "batchgrad": {},
}


def parse_params(params: dict | None) -> dict:
    """Merge ``--params`` with the defaults and validate every score spec."""
    from . import lastlayer

    p = merge_params(params, DEFAULTS, "grad-scores --params")
    for key in ("mean", "std"):
        if p[key] is None:
            raise ConfigError(f"grad-scores --params: '{key}' (input normalization) is required")
    mb = p["max_chunk_mb"]
    if mb is not None and (isinstance(mb, bool) or not isinstance(mb, int | float) or not mb > 0):
        raise ConfigError(f"grad-scores --params: 'max_chunk_mb' must be null or > 0, got {mb!r}")
    if not isinstance(p["scores"], dict) or not p["scores"]:
        raise ConfigError("grad-scores --params: 'scores' must be a non-empty object {name: spec}")
    scores = {}
    for name, spec in p["scores"].items():
        if name in ("index", "labels"):
            raise ConfigError(f"grad-scores --params: score name '{name}' is reserved")
        spec = dict(spec)
        kind = spec.pop("kind", None)
        if kind not in SCORE_KEYS:
            raise ConfigError(f"grad-scores score '{name}': 'kind' must be one of {sorted(SCORE_KEYS)}")
        where = f"grad-scores score '{name}' (kind '{kind}')"
        spec = {"kind": kind, **merge_params(spec, SCORE_KEYS[kind], where)}
        if kind == "gradnorm":
            spec["p"] = lastlayer.check_p(spec["p"])
            if spec["target"] not in ("uniform", "onehot"):
                raise ConfigError(f"grad-scores score '{name}': target must be 'uniform' or 'onehot'")
        if kind == "igoe":
            for key, options in (("order", ("exp_norm", "norm_exp")), ("dist", ("pred", "uniform")),
                                 ("norm", lastlayer.NORMS), ("weight", ("none", "logp_over_p"))):
                if spec[key] not in options:
                    raise ConfigError(f"grad-scores score '{name}': '{key}' must be one of "
                                      f"{list(options)}, got {spec[key]!r}")
            if spec["weight"] != "none" and spec["order"] != "exp_norm":
                raise ConfigError(f"grad-scores score '{name}': weight needs order 'exp_norm'")
            s = spec["samples"]
            if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 1):
                raise ConfigError(f"grad-scores score '{name}': 'samples' must be null or >= 1")
        scores[name] = spec
    p["scores"] = scores
    return p


class GradScorer:
    """Computes the configured scores for batches of inputs, sharing backward passes:
    one per distinct whole-batch loss, plus one per label for exact expectations."""

    def __init__(self, model, params: dict, ref_batch=None):
        import torch

        from .engine import GradientEngine

        self.p = params
        self.model = model.eval()
        self.T = float(params["temperature"])
        self._engines: dict[str, GradientEngine] = {}
        mb = params.get("max_chunk_mb")
        self._make = lambda loss: GradientEngine(
            model, params=params["params"], loss=loss, temperature=self.T,
            strategy=params["strategy"], chunk_size=int(params["chunk_size"]),
            precision=params["precision"],
            max_chunk_bytes=None if mb is None else int(float(mb) * 2**20))
        self.scores = params["scores"]
        self.device = next(model.parameters()).device
        # p = softmax(f/T) weights expectations and draws labels; GradNorm and the exact
        # norm-of-expectation scores never need it (one forward pass saved per batch)
        self.needs_prob = any(s["kind"] == "batchgrad" or (s["kind"] == "igoe" and not (
            s["order"] == "norm_exp" and s["samples"] is None)) for s in self.scores.values())
        self.ref_grad = None
        if any(s["kind"] == "batchgrad" for s in self.scores.values()):
            if ref_batch is None:
                raise ConfigError("grad-scores: a 'batchgrad' score needs --ref-data-dir (ID train)")
            x_ref, y_ref = ref_batch
            # Σ_i ∇(−log p_{y_i}(x_i)): the ID reference term of BatchGrad (eq. 6)
            self.ref_grad = self.engine("ce_label").batch(x_ref, target=y_ref).sum(0)
        self._torch = torch

    def engine(self, loss: str):
        if loss not in self._engines:
            self._engines[loss] = self._make(loss)
        return self._engines[loss]

    @property
    def strategy_used(self) -> str:
        return next(iter(self._engines.values())).strategy_used if self._engines else "n/a"

    @staticmethod
    def _powers(want) -> set:
        """Powers p to reduce for norm keys ('p', value) / 'l1' / 'l2sq'."""
        return {1.0 if k == "l1" else 2.0 if k == "l2sq" else k[1] for k in want}

    @staticmethod
    def _norms(red, want, shift=None):
        """{key: per-row value} (float64 numpy) from a ``GradReductions``: ('p', value) ->
        ‖g‖_p, 'l1' -> Σ|g|, 'l2sq' -> Σg²."""
        out = {}
        for key in want:
            if key == "l1":
                v = red.power_sum(1, shift=shift)
            elif key == "l2sq":
                v = red.power_sum(2, shift=shift)
            else:
                v = red.norm(key[1], shift=shift)
            out[key] = v.cpu().numpy()
        return out

    def __call__(self, x) -> dict[str, np.ndarray]:
        from . import lastlayer

        torch = self._torch
        N = x.shape[0]
        if self.needs_prob:
            with torch.no_grad():
                logits = self.model(x.to(self.device)).double().cpu().numpy()
            prob = lastlayer.softmax_t(logits, self.T)
            C = prob.shape[1]
            keys = lastlayer.row_keys(logits)
        else:  # GradNorm / norm-of-expectation scores only: no forward pass for p
            prob = keys = C = None
        seed = int(self.p["seed"])
        out: dict[str, np.ndarray] = {}

        from .reduce import NormReducer

        def reduced(loss, want, target=None, shifts=None):
            """Per-sample reductions of the batch's gradients for the norm keys ``want``."""
            powers = self._powers(want) or {1.0}
            return self.engine(loss).reduce(x, NormReducer(sorted(powers), shifts), target=target)

        # GradNorm and norm-of-expectation scores: one pass per distinct loss/target
        groups: dict[tuple, list] = {}
        for name, s in self.scores.items():
            if s["kind"] == "gradnorm":
                loss = "kl_uniform" if s["target"] == "uniform" else "ce_pred"
                sign = -1.0 if loss == "ce_pred" else 1.0  # one-hot target: −‖·‖ (GradNorm eq. 7)
                groups.setdefault((loss, None), []).append((name, ("p", s["p"]), sign))
            elif s["kind"] == "igoe" and s["order"] == "norm_exp":
                if s["samples"] is None:
                    loss = "kl_uniform" if s["dist"] == "uniform" else "ce_pred_dist"
                    groups.setdefault((loss, None), []).append((name, s["norm"], 1.0))
                else:
                    key = ("ce_label", s["dist"], s["samples"])
                    groups.setdefault(key, []).append((name, s["norm"], 1.0))
        for key, members in groups.items():
            want = {m[1] for m in members}
            if key[0] == "ce_label":
                q = prob if key[1] == "pred" else np.full_like(prob, 1.0 / C)
                labels = lastlayer.sample_labels(q, key[2], seed, keys)
                red = reduced("ce_label", want, torch.as_tensor(labels))
            else:
                red = reduced(key[0], want)
            norms = self._norms(red, want)
            for name, nk, sign in members:
                out[name] = sign * norms[nk]

        # Expectation-of-norm scores and BatchGrad: per-label passes
        exact = {n: s for n, s in self.scores.items()
                 if (s["kind"] == "igoe" and s["order"] == "exp_norm" and s["samples"] is None)
                 or s["kind"] == "batchgrad"}
        if exact:
            acc = {n: np.zeros(N) for n in exact}
            logp = np.log(np.maximum(prob, np.finfo(np.float64).tiny))
            want = {s["norm"] for s in exact.values() if s["kind"] == "igoe"}
            batchgrad = any(s["kind"] == "batchgrad" for s in exact.values())
            # BatchGrad: ‖g + Σ_i ∇(−log p_{y_i}(x_i^ID))‖₁, the shifted reduction
            shifts = {"ref": self.ref_grad} if batchgrad else None
            for y in range(C):  # loop over labels, vectorized over the batch
                red = reduced("ce_label", want | ({"l1"} if batchgrad else set()),
                              torch.full((N,), y, dtype=torch.long), shifts)
                norms = self._norms(red, want)
                bg = red.power_sum(1, shift="ref").cpu().numpy() if batchgrad else None
                for name, s in exact.items():
                    if s["kind"] == "batchgrad":
                        acc[name] += prob[:, y] * bg
                        continue
                    w = prob[:, y] if s["dist"] == "pred" else np.full(N, 1.0 / C)
                    if s["weight"] == "logp_over_p":
                        w = w * logp[:, y] / np.maximum(prob[:, y], np.finfo(np.float64).tiny)
                    acc[name] += w * norms[s["norm"]]
            out.update(acc)
        sampled = {n: s for n, s in self.scores.items()
                   if s["kind"] == "igoe" and s["order"] == "exp_norm" and s["samples"] is not None}
        for name, s in sampled.items():
            q = prob if s["dist"] == "pred" else np.full_like(prob, 1.0 / C)
            labels = lastlayer.sample_labels(q, s["samples"], seed, keys)
            total = np.zeros(N)
            logp = np.log(np.maximum(prob, np.finfo(np.float64).tiny))
            for k in range(labels.shape[1]):  # loop over draws, vectorized over the batch
                red = reduced("ce_label", {s["norm"]}, torch.as_tensor(labels[:, k]))
                v = self._norms(red, {s["norm"]})[s["norm"]]
                if s["weight"] == "logp_over_p":
                    lk = labels[:, k]
                    v = v * logp[np.arange(N), lk] / np.maximum(prob[np.arange(N), lk], 1e-300)
                total += v
            out[name] = total / labels.shape[1]
        for name, s in self.scores.items():  # store "higher = more ID", like the detectors
            if s["kind"] == "igoe" and name in out:
                out[name] = orientation(s["dist"]) * out[name]
            elif s["kind"] == "batchgrad":  # Y ~ p, like ExGrad: larger for OOD inputs
                out[name] = orientation("pred") * out[name]
        for name, v in out.items():
            if not np.all(np.isfinite(v)):
                bad = int(np.flatnonzero(~np.isfinite(v))[0])
                from ..errors import NumericalError

                raise NumericalError(f"grad-scores: score '{name}' is not finite for batch row {bad}")
        return out


def reference_batch(data_dir, num_classes: int, p: dict, device):
    """One ID-train sample per class (first of each class in a seeded shuffle)."""
    import torch

    from ..job import batch_source

    xs: dict[int, torch.Tensor] = {}
    for x, y, _rows in batch_source(data_dir, None, p, device, shuffle=True, seed=int(p["seed"]),
                                    where="grad-scores --params")():
        y = torch.as_tensor(y).cpu()
        for cls in torch.unique(y).tolist():  # loop over classes present in the batch
            if cls >= 0 and cls not in xs:
                xs[cls] = x[int(torch.nonzero(y == cls)[0, 0])]
        if len(xs) == num_classes:
            break
    missing = sorted(set(range(num_classes)) - set(xs))
    if missing:
        raise DataError(f"{data_dir}: no ID-train sample of class(es) {missing} for BatchGrad")
    return torch.stack([xs[c] for c in range(num_classes)]), torch.arange(num_classes)


def run_grad_scores(model_path, data_dir, shard, params: dict | None, out, ref_data_dir=None) -> dict:
    """Compute the configured scores over one shard and write the store ``out``."""
    import torch

    from ..data.loader import num_samples
    from ..data.manifest import shard_layout
    from ..job import batch_source, open_model
    from ..runtime import Timer, hardware_description, progress
    from ..store import ShardWriter

    p = parse_params(params)
    device, model, _meta = open_model(model_path, p)
    ref = None
    if any(s["kind"] == "batchgrad" for s in p["scores"].values()):
        if not ref_data_dir:
            raise ConfigError("grad-scores: a 'batchgrad' score needs --ref-data-dir (ID train)")
        ref = reference_batch(ref_data_dir, int(model.head.out_features), p, device)
    scorer = GradScorer(model, p, ref)
    n = num_samples(data_dir, shard)
    timer = Timer()
    t0 = time.perf_counter()
    attrs = {"kind": "grad-scores", "params": {k: v for k, v in p.items()}, "model": str(model_path),
             "data_dir": str(data_dir), "shard": shard}
    with ShardWriter(out, n_rows=n, attrs=attrs, layout=shard_layout(data_dir, shard)) as w:
        for name in p["scores"]:
            w.create(name, (n,), "float64")
        w.create("index", (n,), "int64")
        w.create("labels", (n,), "int64")
        pos = 0
        batches = batch_source(data_dir, shard, p, device, where="grad-scores --params")()
        for x, y, rows in progress(f"grad-scores {data_dir} shard {shard}", batches, n):
            with timer("grad_scores", device):
                vals = scorer(x)
            k = x.shape[0]
            for name, v in vals.items():
                w.write(name, pos, v)
            w.write("index", pos, np.asarray(torch.as_tensor(rows).cpu(), dtype=np.int64))
            w.write("labels", pos, np.asarray(torch.as_tensor(y).cpu(), dtype=np.int64))
            pos += k
        if pos != n:
            raise DataError(f"{data_dir} shard {shard}: loader yielded {pos} samples, manifest has {n}")
        w.attrs["timing"] = {"grad_scores_s": timer.totals.get("grad_scores", 0.0),
                             "total_s": time.perf_counter() - t0,
                             "samples_per_s": n / max(timer.totals.get("grad_scores", 1e-9), 1e-9)}
        w.attrs["strategy"] = scorer.strategy_used
        w.attrs["num_params"] = next(iter(scorer._engines.values())).num_params
        w.attrs["hardware"] = hardware_description(device)
    log.info("grad-scores: %d samples, strategy %s, %.1f samples/s -> %s", n, scorer.strategy_used,
             n / max(timer.totals.get("grad_scores", 1e-9), 1e-9), out)
    return attrs


def cmd_grad_scores(args) -> None:
    from ..runtime import seed_everything, set_threads

    set_threads()
    params = dict(args.params)
    seed_everything(int(params.get("seed", 0)))
    run_grad_scores(args.model, args.data_dir, args.shard, params, args.out, args.ref_data_dir)
