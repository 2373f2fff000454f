"""Detectors on reduced gradients g = G(x)V ∈ R^K (low-dimensional gradient paper, §3.3).

All are fitted on the ID-train reduced-gradient stores (arrays ``reduced`` and
``labels``) and score from ``reduced`` alone; higher = more in-distribution.

- ``grad_msp``     S_1 = max_j softmax(y)_j with y = FC(BN(g))                   (eq. 5–6)
- ``grad_energy``  S_2 = T·logsumexp(y/T) (negative free energy; the paper writes eq. 7
                   with the sign that makes ID scores large)
- ``grad_react``   y = FC(Clip(BN(g))): the last d dims clipped above at c, the
                   ``percentile``-th percentile of BN(g)_d over ID train; energy score  (eq. 8)
- ``grad_bats``    the last d dims of BN(g) clipped to the typical set [β − λ|γ|, β + λ|γ|]
                   of the head's BN (β bias, γ weight); energy score                   (eq. 8)
- ``grad_mahalanobis``  S_3 = max_c −(g − μ̂_c)ᵀ Σ̂⁻¹ (g − μ̂_c), tied covariance       (eq. 9)
- ``grad_knn``     S_4 = −‖ĝ − ĝ_(k)‖ with ĝ = g/‖g‖ and ĝ_(k) the k-th nearest ID-train
                   neighbour (FAISS exact L2)                                          (eq. 10)

The BN→FC head (eq. 5) is trained with cross-entropy by SGD (defaults as in §4.1: lr 0.01,
batch 512, 3 epochs; momentum 0.9 is our choice, the paper does not state it), seeded, so
``grad_msp``, ``grad_energy``, ``grad_react`` and ``grad_bats`` with the same head
hyperparameters fit the identical head. Paper defaults for ImageNet: d = 50, p = 0.7
(``percentile: 70``), λ = 0.1, KNN k = 10 (k = 5 on CIFAR-10).

The ensemble S = S_f + α·S_b (eq. 11, α = 1) combines a feature-space and a gradient-space
score file: :func:`ensemble_scores` and the ``gradspace ensemble-scores`` command.
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import ConfigError, DataError
from ..numerics import energy_score, softmax
from .base import Detector, check_finite, register_detector

log = logging.getLogger(__name__)

HEAD_DEFAULTS = {"lr": 0.01, "batch_size": 512, "epochs": 3, "momentum": 0.9, "weight_decay": 0.0,
                 "seed": None, "num_classes": None}
BN_EPS = 1e-5


def train_head(X: np.ndarray, y: np.ndarray, num_classes: int, lr=0.01, batch_size=512, epochs=3,
               momentum=0.9, weight_decay=0.0, seed=0) -> dict:
    """Fit g → BatchNorm1d(K) → Linear(K, C) with cross-entropy and SGD (eq. 5); returns
    numpy state: BN running mean/var, weight γ, bias β, FC weight/bias."""
    import torch

    X = torch.as_tensor(np.asarray(X, np.float32))
    y = torch.as_tensor(np.asarray(y, np.int64))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        bn = torch.nn.BatchNorm1d(X.shape[1], eps=BN_EPS)
        fc = torch.nn.Linear(X.shape[1], num_classes)
        net = torch.nn.Sequential(bn, fc).train()
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(int(seed))
        for _ in range(int(epochs)):
            perm = torch.randperm(X.shape[0], generator=gen)
            for a in range(0, X.shape[0], int(batch_size)):
                idx = perm[a:a + int(batch_size)]
                if idx.numel() < 2:  # BatchNorm needs two samples
                    continue
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(net(X[idx]), y[idx])
                loss.backward()
                opt.step()
    st = {"bn_mean": bn.running_mean, "bn_var": bn.running_var, "bn_weight": bn.weight,
          "bn_bias": bn.bias, "fc_weight": fc.weight, "fc_bias": fc.bias}
    return {k: v.detach().double().numpy().copy() for k, v in st.items()}


def head_bn(state, g: np.ndarray) -> np.ndarray:
    g = np.asarray(g, np.float64)
    return (g - state["bn_mean"]) / np.sqrt(state["bn_var"] + BN_EPS) * state["bn_weight"] + state["bn_bias"]


def head_fc(state, z: np.ndarray) -> np.ndarray:
    return z @ state["fc_weight"].T + state["fc_bias"]




class _GradientDetector(Detector):
    """Every gradient detector takes ``dims``: use only the first ``dims`` coordinates of
    the reduced gradients (null: all). On PCA these are the top-``dims`` principal
    directions, i.e. the PCA subspace of dimension ``dims`` <= subspace.k, so a grid on
    ``dims`` searches the subspace dimension K without computing the subspace again.
    The AG basis has no order (one direction per class mean, orthonormalized), so on AG
    ``dims`` is ignored: all its dimensions are used (the fit logs it)."""

    embedding = "gradient"
    requires = ("reduced", "labels")
    score_requires = ("reduced",)
    needs_fit = True

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.defaults = {**cls.defaults, "dims": None}

    def _train_arrays(self, train, ctx=None):
        X = check_finite("reduced", np.asarray(train["reduced"], np.float64), "ID-train reduced gradients")
        y = np.asarray(train["labels"], np.int64)
        if (y < 0).any():
            raise DataError(f"detector '{self.method}': ID-train labels contain {int((y < 0).sum())} "
                            "negative (OOD) labels")
        self._dims = self._used_dims(X.shape[1], ctx)
        return X[:, :self._dims], y

    def _used_dims(self, K: int, ctx) -> int:
        dims = self.hparams.get("dims")
        if dims is None:
            return K
        space = (ctx.extra.get("space") if ctx is not None else None)
        if space == "ag":
            log.info("detector '%s': dims = %s ignored on the AG space (its basis has no order); "
                     "using all %d dimensions", self.method, dims, K)
            return K
        dims = int(dims)
        if not 1 <= dims <= K:
            raise ConfigError(f"detector '{self.method}': dims = {dims} must be in [1, {K}] "
                              "(the dimension of the reduced gradients, subspace.k on PCA)")
        return dims

    def _reduced(self, emb):
        g = check_finite("reduced", np.asarray(emb["reduced"], np.float64), "reduced gradients")
        dims = getattr(self, "_dims", None)
        if dims is None:
            return g
        if g.shape[1] < dims:
            raise DataError(f"detector '{self.method}': reduced gradients have {g.shape[1]} "
                            f"dimensions, the detector was fitted on {dims}")
        return g[:, :dims]

    def state_dict(self):
        state = super().state_dict()
        if getattr(self, "_dims", None) is not None:
            state["dims"] = np.asarray(self._dims, np.int64)
        return state

    def load_state_dict(self, state):
        state = dict(state)
        dims = state.pop("dims", None)
        self._dims = None if dims is None else int(dims)
        super().load_state_dict(state)


class _HeadDetector(_GradientDetector):
    extra_defaults: dict = {}

    def __init_subclass__(cls, **kw):
        cls.defaults = {**HEAD_DEFAULTS, **cls.extra_defaults}
        super().__init_subclass__(**kw)

    def fit(self, train, ctx) -> None:
        X, y = self._train_arrays(train, ctx)
        h = self.hparams
        C = int(h["num_classes"] or ctx.num_classes or (y.max() + 1))
        if y.max() >= C:
            raise DataError(f"detector '{self.method}': label {int(y.max())} >= num_classes {C}")
        seed = ctx.seed if h["seed"] is None else h["seed"]
        self.state = train_head(X, y, C, h["lr"], h["batch_size"], h["epochs"], h["momentum"],
                                h["weight_decay"], seed)
        self._fit_clip(X)

    def _fit_clip(self, X) -> None:
        pass

    def _logits(self, g):
        return head_fc(self.state, self._clip(head_bn(self.state, g)))

    def _clip(self, z):
        return z

    def _last(self, K):
        d = int(self.hparams["d"])
        if d < 1:
            raise ConfigError(f"detector '{self.method}': d must be >= 1")
        return slice(max(0, K - d), K)


@register_detector
class GradMSP(_HeadDetector):
    """S_1 = max softmax of the BN→FC head on reduced gradients (eq. 6)."""

    method = "grad_msp"

    def score(self, emb):
        return softmax(self._logits(self._reduced(emb)), axis=1).max(axis=1)


@register_detector
class GradEnergy(_HeadDetector):
    """S_2 = T·logsumexp(y/T) of the BN→FC head (eq. 7)."""

    method = "grad_energy"
    extra_defaults = {"temperature": 1.0}

    def score(self, emb):
        return energy_score(self._logits(self._reduced(emb)), float(self.hparams["temperature"]))


@register_detector
class GradReAct(_HeadDetector):
    """Clip(z_d) = min(z_d, c) on the last d BN outputs, c their p-th percentile on ID train (eq. 8)."""

    method = "grad_react"
    extra_defaults = {"d": 50, "percentile": 70.0, "temperature": 1.0}

    def _fit_clip(self, X):
        p = float(self.hparams["percentile"])
        if not 0 < p <= 100:
            raise ConfigError(f"detector 'grad_react': percentile must be in (0, 100], got {p}")
        z = head_bn(self.state, X)[:, self._last(X.shape[1])]
        self.state["threshold"] = np.float64(np.percentile(z, p))

    def _clip(self, z):
        z = z.copy()
        sl = self._last(z.shape[1])
        z[:, sl] = np.minimum(z[:, sl], self.state["threshold"])
        return z

    def score(self, emb):
        return energy_score(self._logits(self._reduced(emb)), float(self.hparams["temperature"]))


@register_detector
class GradBATS(_HeadDetector):
    """Last d BN outputs clipped to the typical set [β − λ|γ|, β + λ|γ|] (eq. 8, BATS)."""

    method = "grad_bats"
    extra_defaults = {"d": 50, "lam": 0.1, "temperature": 1.0}

    def _clip(self, z):
        z = z.copy()
        sl = self._last(z.shape[1])
        lam = float(self.hparams["lam"])
        beta, gamma = self.state["bn_bias"][sl], np.abs(self.state["bn_weight"][sl])
        z[:, sl] = np.clip(z[:, sl], beta - lam * gamma, beta + lam * gamma)
        return z

    def score(self, emb):
        return energy_score(self._logits(self._reduced(emb)), float(self.hparams["temperature"]))


@register_detector
class GradMahalanobis(_GradientDetector):
    """S_3 = max_c −(g − μ̂_c)ᵀ Σ̂⁺ (g − μ̂_c), class means and tied covariance (eq. 9)."""

    method = "grad_mahalanobis"
    defaults = {}

    def fit(self, train, ctx):
        X, y = self._train_arrays(train, ctx)
        classes = np.unique(y)
        means = np.stack([X[y == c].mean(0) for c in classes])
        R = X - means[np.searchsorted(classes, y)]
        cov = R.T @ R / X.shape[0]
        self.state = {"means": means, "precision": np.linalg.pinv(cov, hermitian=True), "classes": classes}

    def score(self, emb):
        g = self._reduced(emb)
        P, mu = self.state["precision"], self.state["means"]
        best = None
        for c in range(mu.shape[0]):
            d = g - mu[c]
            s = -np.einsum("ij,jk,ik->i", d, P, d)
            best = s if best is None else np.maximum(best, s)
        return best


@register_detector
class GradKNN(_GradientDetector):
    """S_4 = −‖ĝ − ĝ_(k)‖, normalized reduced gradients, k-th nearest ID-train neighbour (eq. 10)."""

    method = "grad_knn"
    defaults = {"k": 10}

    @staticmethod
    def _normalize(g):
        n = np.linalg.norm(g, axis=1, keepdims=True)
        return (g / np.maximum(n, 1e-12)).astype(np.float32)

    def fit(self, train, ctx):
        X, _ = self._train_arrays(train, ctx)
        k = int(self.hparams["k"])
        if not 1 <= k <= X.shape[0]:
            raise ConfigError(f"detector 'grad_knn': k={k} must be in [1, {X.shape[0]}] (ID-train size)")
        self.state = {"bank": self._normalize(X)}
        self._index = None

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._index = None

    def score(self, emb):
        from .knn import build_index

        if getattr(self, "_index", None) is None:
            self._index = build_index(np.asarray(self.state["bank"], dtype=np.float32))
        k = int(self.hparams["k"])
        D, _ = self._index.search(np.ascontiguousarray(self._normalize(self._reduced(emb))), k)
        return -np.sqrt(np.maximum(D[:, k - 1].astype(np.float64), 0.0))


def ensemble_scores(feature: np.ndarray, gradient: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """S = S_f + α·S_b (eq. 11; the paper uses α = 1)."""
    feature, gradient = np.asarray(feature, np.float64), np.asarray(gradient, np.float64)
    if feature.shape != gradient.shape:
        raise DataError(f"ensemble: feature scores {feature.shape} and gradient scores {gradient.shape} "
                        "differ in shape")
    check_finite("feature scores", feature)
    check_finite("gradient scores", gradient)
    return feature + float(alpha) * gradient


# -- parse-time checks -------------------------------------------------------------------------

def reduced_dims(spaces, k: int, num_classes: int, centred: bool = True,
                 orthonormalize: bool = True) -> dict[str, int]:
    """The dimension of each reduced space: k for PCA; for AG the rank bound of the class
    means, C − 1 when the gradients are centred (subspace.normalize.mean: Σ_c n_c μ_c = 0)
    and orthonormalized, else C (gradspace.subspace.ag; the run may find a smaller rank)."""
    dims = {}
    for space in spaces:
        if space == "pca":
            dims[space] = int(k)
        elif space == "ag":
            C = int(num_classes)
            dims[space] = C - 1 if (centred and orthonormalize) else C
        else:
            raise ConfigError(f"subspace.types: unknown space {space!r} (pca, ag)")
    return dims


def check_dims(detectors_cfg, spaces, k: int, num_classes: int, centred: bool = True,
               orthonormalize: bool = True) -> list[str]:
    """Check the ``d`` of the gradient-space detectors that clip the last d dimensions of
    the reduced gradient (grad_react, grad_bats), and every gradient detector's ``dims``,
    against each space's dimension. A ``dims`` above subspace.k is a ConfigError; ``dims``
    with an AG space gives a warning (it is ignored there). A ``d`` above ``dims`` clips
    every used dimension.

    ``detectors_cfg``: the subspace.detectors section, {name: {method, hparams...}}.
    PCA: d > subspace.k is a ConfigError naming the detector, its d and k (both are chosen
    in the config; such a d clips every dimension). AG: its dimension follows from the
    class count, and one detector table serves both spaces, so a larger d is capped at it
    (every dimension clipped, as the detector does at run time); returns one warning per
    such detector and space for the caller to log."""
    from .base import get_detector

    dims = reduced_dims(spaces, k, num_classes, centred, orthonormalize)
    warnings = []
    for name, cfg in (detectors_cfg or {}).items():
        hparams = dict(cfg or {})
        cls = get_detector(hparams.pop("method", name))
        if not issubclass(cls, _GradientDetector):
            continue
        used = cls(**hparams).hparams.get("dims")
        if used is not None:
            if int(used) < 1:
                raise ConfigError(f"subspace.detectors.{name} ({cls.method}): dims must be >= 1, "
                                  f"got {used}")
            if "pca" in dims and int(used) > dims["pca"]:
                raise ConfigError(
                    f"subspace.detectors.{name} ({cls.method}): dims = {used} exceeds the "
                    f"dimension of the PCA space, subspace.k = {dims['pca']}; set dims <= "
                    f"{dims['pca']} (or raise subspace.k)")
            if "ag" in dims:
                warnings.append(f"subspace.detectors.{name} ({cls.method}): dims applies to the "
                                "PCA space only; on AG (no order among its directions) every "
                                "dimension is used")
        if "d" not in cls.defaults:
            continue
        d = int(cls(**hparams).hparams["d"])
        if d < 1:
            raise ConfigError(f"subspace.detectors.{name} ({cls.method}): d must be >= 1, got {d}")
        for space, dim in dims.items():
            if d <= dim:
                continue
            if space == "pca":
                raise ConfigError(
                    f"subspace.detectors.{name} ({cls.method}): d = {d} exceeds the dimension of "
                    f"the PCA space, subspace.k = {dim}; set d <= {dim} (or raise subspace.k)")
            warnings.append(
                f"subspace.detectors.{name} ({cls.method}): d = {d} exceeds the dimension of the "
                f"AG space ({dim} = {'C - 1' if dim < int(num_classes) else 'C'}, "
                f"data.id.num_classes = {num_classes}); on AG it clips all {dim} dimensions")
    return warnings
