"""GROOD: gradient-aware OOD detection with class and OOD prototypes.

ElAraby, Sahoo, Pequignot, Novello & Paull, "GROOD: GRadient-Aware Out-of-Distribution
Detection", TMLR 2025 (algorithm as in the project's GROOD algorithm notes).

With z(x) the penultimate feature, class prototypes p_c = mean of z over ID-train samples
of class c, and an OOD prototype p_ood, the C+1 "logits" s_j = −‖z − p_j‖₂ and the loss
CE(s, ŷ) with ŷ = argmax f(x) give the gradient with respect to p_ood in closed form

    g(x) = ∂CE/∂p_ood = softmax(s)_ood · (z − p_ood) / ‖z − p_ood‖₂

(ŷ is never the OOD slot, so only the softmax term depends on p_ood). The fitted state is
the bank of g over the correctly classified ID-train samples; the score is minus the
L2 distance from g(x) to its k-th nearest bank entry (exact FAISS search; k = 1 as in the
paper). Higher = more ID.

OOD prototype (``ood_prototype``):

- ``synthetic`` (default): mixup at an early stage: early-stage class prototypes
  P^early_c from ID train; each ID-train sample's early activation e(x) is mixed with the
  early prototype of its second most likely class, λ·e(x) + (1 − λ)·P^early_{c2}
  (``lam`` = 0.5), run through the rest of the network, and p_ood is the mean of the
  resulting penultimate features. ``stage`` (default: the first of ``model.stage_names``).
  Needs a model pass over the ID-train data: ``FitContext.extra`` keys ``data_dir``
  (prepared ID-train dataset) and ``compute`` ({device, batch_size, num_workers, mean,
  std}); the model comes from ``extra["model"]`` or ``model_path``.
- ``noise``: ``noise_n`` blurred uniform-noise images (seeded), keeping the ``noise_keep``
  fraction with the lowest T·logsumexp(f) (most OOD-like by energy); p_ood = their mean
  feature. Image shape from the dataset's info.json (``data_dir``) or ``extra["image_shape"]``.
- ``mean``: the mean of the class prototypes (no model pass).
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import ConfigError, DataError
from .base import Detector, check_finite, register_detector
from .gradnorm import choice, features_logits, flag, positive
from .knn import build_index

log = logging.getLogger(__name__)
DIST_EPS = 1e-12


# -- pure array functions -------------------------------------------------------------------
def class_sums(features: np.ndarray, labels: np.ndarray, num_classes: int):
    """Per-class feature sums (C×D) and counts (C) of the labelled rows (label >= 0)."""
    labels = np.asarray(labels, dtype=np.int64)
    ok = labels >= 0
    if ok.any() and labels[ok].max() >= num_classes:
        raise DataError(f"GROOD: label {int(labels[ok].max())} >= number of classes {num_classes}")
    sums = np.zeros((num_classes, features.shape[1]))
    np.add.at(sums, labels[ok], features[ok])
    counts = np.bincount(labels[ok], minlength=num_classes).astype(np.float64)
    return sums, counts


def grood_gradients(features: np.ndarray, prototypes: np.ndarray, ood_prototype: np.ndarray) -> np.ndarray:
    """g(x) = softmax(s)_ood · (z − p_ood)/‖z − p_ood‖ with s = −‖z − p_j‖ over the C class
    prototypes and p_ood (N×D, float64)."""
    z = np.asarray(features, dtype=np.float64)
    P = np.vstack([np.asarray(prototypes, dtype=np.float64),
                   np.asarray(ood_prototype, dtype=np.float64)[None]])
    d2 = (z * z).sum(1)[:, None] - 2.0 * z @ P.T + (P * P).sum(1)[None, :]
    s = -np.sqrt(np.maximum(d2, 0.0))
    s -= s.max(axis=1, keepdims=True)
    e = np.exp(s)
    sigma_ood = e[:, -1] / e.sum(axis=1)
    diff = z - P[-1][None, :]
    dist = np.linalg.norm(diff, axis=1)
    return sigma_ood[:, None] * diff / np.maximum(dist, DIST_EPS)[:, None]


# -- model passes for the OOD prototype ------------------------------------------------------
def _head_inputs(model):
    """Context manager capturing the head's input (the penultimate features) per forward."""
    import contextlib

    @contextlib.contextmanager
    def capture():
        got: list = []
        handle = model.head.register_forward_pre_hook(lambda mod, args: got.append(args[0].detach()))
        try:
            yield got
        finally:
            handle.remove()
    return capture()


def synthetic_ood_prototype(model, make_batches, num_classes: int, stage: str | None = None,
                            lam: float = 0.5) -> np.ndarray:
    """Mean penultimate feature of early-layer mixups (GROOD §5.2): two streaming passes
    over ``make_batches()`` (yielding (x, y, ...) with ground-truth labels y)."""
    import torch

    names = list(getattr(model, "stage_names", []) or [])
    if not names or not callable(getattr(model, "forward_until", None)):
        raise ConfigError("GROOD synthetic OOD prototype needs a model with stage_names, "
                          "forward_until and forward_from")
    stage = stage or names[0]
    if stage not in names:
        raise ConfigError(f"GROOD: unknown stage '{stage}'; stages: {', '.join(names)}")
    model.eval()
    sums, counts = None, torch.zeros(num_classes, dtype=torch.float64)
    with torch.no_grad():
        for b in make_batches():
            x, y = b[0], torch.as_tensor(b[1]).long().to(b[0].device)
            e = model.forward_until(stage, x).double()
            if sums is None:
                sums = torch.zeros((num_classes, *e.shape[1:]), dtype=torch.float64, device=e.device)
            ok = y >= 0
            sums.index_add_(0, y[ok], e[ok])
            counts += torch.bincount(y[ok].cpu(), minlength=num_classes).double()
        if sums is None or counts.sum() == 0:
            raise DataError("GROOD: no labelled ID-train samples for the synthetic OOD prototype")
        if (counts == 0).any():
            raise DataError(f"GROOD: no ID-train sample of class(es) "
                            f"{torch.nonzero(counts == 0).flatten().tolist()}")
        early = sums / counts.to(sums.device).view(-1, *([1] * (sums.dim() - 1)))
        total, n = None, 0
        for b in make_batches():
            x = b[0]
            e = model.forward_until(stage, x)
            logits = model.forward_from(stage, e)
            second = logits.topk(2, dim=1).indices[:, 1]
            mixed = lam * e + (1.0 - lam) * early[second].to(e.dtype)
            with _head_inputs(model) as got:
                model.forward_from(stage, mixed)
            z = got[-1].flatten(1).double()
            total = z.sum(0) if total is None else total + z.sum(0)
            n += z.shape[0]
    return (total / n).cpu().numpy()


def noise_ood_prototype(model, image_shape, mean, std, n: int = 1000, keep: float = 0.1,
                        seed: int = 0, batch_size: int = 256, device=None, blur_sigma: float = 1.0):
    """Mean feature of the ``keep`` fraction of ``n`` blurred uniform-noise images with the
    lowest logsumexp(f) (most OOD-like by energy)."""
    import torch
    from torchvision.transforms.functional import gaussian_blur

    device = device or next(model.parameters()).device
    gen = torch.Generator().manual_seed(int(seed))
    c = image_shape[0]
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).expand(1, c, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1).expand(1, c, 1, 1)
    feats, lse = [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, n, batch_size):
            k = min(batch_size, n - start)
            x = torch.rand((k, *image_shape), generator=gen)
            x = gaussian_blur(x, kernel_size=5, sigma=blur_sigma)
            x = ((x - m) / s).to(device)
            z = model.forward_features(x).flatten(1)
            logits = model.head(z)
            feats.append(z.double().cpu())
            lse.append(torch.logsumexp(logits.double(), dim=1).cpu())
    feats, lse = torch.cat(feats), torch.cat(lse)
    n_keep = max(1, int(round(keep * n)))
    idx = torch.argsort(lse)[:n_keep]
    return feats[idx].mean(0).numpy()


# -- detector --------------------------------------------------------------------------------
@register_detector
class GROOD(Detector):
    needs_head = True
    method = "grood"
    embedding = "gradient"
    requires = ("logits", "features", "labels")
    score_requires = ("logits", "features")
    needs_fit = True
    defaults = {"ood_prototype": "synthetic", "lam": 0.5, "stage": None, "k": 1,
                "noise_n": 1000, "noise_keep": 0.1, "only_correct": True}

    def __init__(self, **hparams):
        super().__init__(**hparams)
        h = self.hparams
        choice(self.method, "ood_prototype", h["ood_prototype"], ("synthetic", "noise", "mean"))
        lam = float(h["lam"])
        if not 0.0 <= lam <= 1.0:
            raise ConfigError(f"detector 'grood': 'lam' must be in [0, 1], got {h['lam']!r}")
        k = h["k"]
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ConfigError(f"detector 'grood': 'k' must be a positive integer, got {k!r}")
        if int(h["noise_n"]) < 1:
            raise ConfigError(f"detector 'grood': 'noise_n' must be >= 1, got {h['noise_n']!r}")
        keep = positive(self.method, "noise_keep", h["noise_keep"])
        if keep > 1:
            raise ConfigError(f"detector 'grood': 'noise_keep' must be in (0, 1], got {keep}")
        h["only_correct"] = flag(self.method, "only_correct", h["only_correct"])
        self._index = None

    def fit(self, train, ctx) -> None:
        feats, logits = features_logits(train, self.method)
        labels = np.asarray(train["labels"], dtype=np.int64)
        C = logits.shape[1]
        sums, counts = class_sums(feats, labels, C)
        if (counts == 0).any():
            raise DataError(f"detector 'grood': ID-train has no sample of class(es) "
                            f"{np.flatnonzero(counts == 0).tolist()}")
        protos = sums / counts[:, None]
        p_ood = self.ood_prototype(protos, ctx)
        check_finite("GROOD OOD prototype", p_ood)
        keep = labels >= 0
        if self.hparams["only_correct"]:
            keep &= logits.argmax(axis=1) == labels
        if keep.sum() < self.hparams["k"]:
            raise DataError(f"detector 'grood': only {int(keep.sum())} correctly classified ID-train "
                            f"samples, k = {self.hparams['k']}")
        bank = grood_gradients(feats[keep], protos, p_ood).astype(np.float32)
        self.state = {"prototypes": protos, "ood_prototype": p_ood, "bank": bank}
        self._index = None

    def ood_prototype(self, protos: np.ndarray, ctx) -> np.ndarray:
        variant = self.hparams["ood_prototype"]
        if variant == "mean":
            return protos.mean(axis=0)
        model, device, compute, data_dir = _fit_resources(ctx, needs_data=variant == "synthetic")
        if variant == "synthetic":
            from ..data.loader import iter_batches

            def make_batches():
                return iter_batches(data_dir, batch_size=int(compute.get("batch_size", 256)),
                                    shuffle=False, num_workers=int(compute.get("num_workers", 0)),
                                    mean=compute["mean"], std=compute["std"], device=device)

            return synthetic_ood_prototype(model, make_batches, protos.shape[0],
                                           self.hparams["stage"], float(self.hparams["lam"]))
        shape = ctx.extra.get("image_shape")
        if shape is None:
            if not data_dir:
                raise ConfigError("detector 'grood' (noise prototype): FitContext.extra needs "
                                  "'data_dir' or 'image_shape'")
            from ..data.loader import read_info

            info = read_info(data_dir)
            shape = (int(info["channels"]), int(info["image_size"]), int(info["image_size"]))
        return noise_ood_prototype(model, tuple(shape), compute["mean"], compute["std"],
                                   int(self.hparams["noise_n"]), float(self.hparams["noise_keep"]),
                                   seed=int(ctx.seed), batch_size=int(compute.get("batch_size", 256)),
                                   device=device)

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self._index = None

    def score(self, emb) -> np.ndarray:
        if "bank" not in self.state:
            raise ConfigError("detector 'grood' is not fitted")
        feats, _ = features_logits(emb, self.method)
        protos = np.asarray(self.state["prototypes"])
        if feats.shape[1] != protos.shape[1]:
            raise DataError(f"detector 'grood': features have {feats.shape[1]} dims, the fitted "
                            f"prototypes {protos.shape[1]}")
        if feats.shape[0] == 0:
            return np.zeros(0)
        if self._index is None:
            self._index = build_index(np.asarray(self.state["bank"], dtype=np.float32))
        g = grood_gradients(feats, protos, self.state["ood_prototype"])
        k = int(self.hparams["k"])
        d2, _ = self._index.search(np.ascontiguousarray(g, dtype=np.float32), k)
        return -np.sqrt(np.maximum(d2[:, k - 1].astype(np.float64), 0.0))


def _fit_resources(ctx, needs_data: bool):
    """Model (eval, on the compute device), device, compute params and ID-train data dir
    from the FitContext (see the module docstring for the keys)."""
    from ..runtime import resolve_device

    compute = dict(ctx.extra.get("compute") or {})
    for key in ("mean", "std"):
        if compute.get(key) is None and ctx.extra.get(key) is not None:
            compute[key] = ctx.extra[key]
        if compute.get(key) is None:
            raise ConfigError(f"detector 'grood': FitContext.extra['compute']['{key}'] (input "
                              "normalization) is required for the model pass")
    data_dir = ctx.extra.get("data_dir")
    if needs_data and not data_dir:
        raise ConfigError("detector 'grood' (synthetic prototype): FitContext.extra['data_dir'] "
                          "(the prepared ID-train dataset) is required")
    device = resolve_device(compute.get("device", "auto"))
    model = ctx.extra.get("model")
    if model is None:
        if not ctx.model_path:
            raise ConfigError("detector 'grood': a model (--model) is needed for the "
                              f"'{'synthetic' if needs_data else 'noise'}' OOD prototype")
        from ..models import load_model

        model, _ = load_model(ctx.model_path, device)
    model = model.to(device).eval()
    return model, device, compute, data_dir
