"""Gradient-pass diagnostics (paper Tables 9 and 13) streamed batch by batch, against a
direct computation on explicitly formed gradient matrices; the ID-train reference of the
nearest-neighbour search split into pieces gives the same distances."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradspace.errors import DataError
from gradspace.subspace import ag, power
from gradspace.subspace.diagnostics import gradient_pass_diagnostics, load_class_means, sample_rows
from gradspace.subspace.operators import JvpVjpOperator, PerSampleOperator
from test_subspace import batches, explicit_G, full_basis, layout_of, make_data, make_model, stats_of


class CountingOp(PerSampleOperator):
    calls = 0

    def gradients(self, x, timer=None):
        CountingOp.calls += 1
        return super().gradients(x, timer)


def unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("diag")
    model = make_model()
    layout = layout_of(model)
    x, y = make_data(90)
    st, _ = stats_of(model, x, layout)
    sums, counts = ag.class_sums(JvpVjpOperator(model, layout, st), batches(x, y, 16), 3)
    ag.write_ag_partial(tmp / "ag0.zarr", layout, sums, counts, {"shard": 0})
    ag.reduce_ag([tmp / "ag0.zarr"], layout, tmp / "ag.zarr", True, st)
    xt, yt = make_data(40, seed=5)
    xo = torch.randn(30, 1, 6, 6, generator=torch.Generator().manual_seed(9))
    sets = {"id_train": (x, y), "id_test": (xt, yt), "ood": (xo, torch.full((30,), -1))}
    rows = {ds: sample_rows(len(v[0]), 25, 0, salt) for salt, (ds, v) in enumerate(sorted(sets.items()))}
    G = {ds: explicit_G(model, v[0], st) for ds, v in sets.items()}
    return model, layout, st, sets, rows, G, tmp / "ag.zarr"


def direct(G, sets, rows, means):
    ref = unit(G["id_train"][rows["id_train"]])
    dist = {}
    for ds in ("id_test", "ood"):
        q = unit(G[ds][rows[ds]])
        d = np.sqrt(((q[:, None, :] - ref[None, :, :]) ** 2).sum(-1))
        dist[ds] = d.min(1)
    cos = {}
    for ds in ("id_train", "id_test"):
        g, lab = G[ds][rows[ds]], sets[ds][1].numpy()[rows[ds]]
        mu = means[:, lab].T
        cos[ds] = (g * mu).sum(1) / (np.linalg.norm(g, axis=1) * np.linalg.norm(mu, axis=1))
    return dist, cos


@pytest.mark.parametrize("pieces", [1, 4])
def test_streamed_diagnostics_equal_direct_computation(case, pieces):
    model, layout, st, sets, rows, G, ag_path = case
    g, _, _ = power.read_basis(ag_path, "subspace")
    means_full = full_basis(g, layout, "means")
    want_dist, want_cos = direct(G, sets, rows, means_full)
    P = layout.num_params
    per_piece = -(-len(rows["id_train"]) // pieces)
    op = CountingOp(model, layout, st)
    CountingOp.calls = 0
    fns = {ds: (lambda v=v: iter(batches(v[0], v[1], 16))) for ds, v in sets.items()}
    dist, cos, lab = gradient_pass_diagnostics(op, fns, rows, "id_train", load_class_means(g, layout),
                                               max_bytes=per_piece * 4 * P + 1)
    for ds in ("id_test", "ood"):
        np.testing.assert_allclose(dist[ds], want_dist[ds], rtol=1e-5, atol=1e-6)
    assert set(cos) == {"id_train", "id_test"}
    for ds in cos:
        np.testing.assert_allclose(cos[ds], want_cos[ds], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(lab[ds], sets[ds][1].numpy()[rows[ds]])
    # one gradient pass over the reference pieces, and one over each query set per piece
    # (batches of 16 holding a sampled row each)
    n_batches = {ds: len({int(r) // 16 for r in rows[ds]}) for ds in sets}
    pieces_rows = [rows["id_train"][i:i + per_piece] for i in range(0, len(rows["id_train"]), per_piece)]
    ref_calls = sum(len({int(r) // 16 for r in p}) for p in pieces_rows)
    assert CountingOp.calls == ref_calls + len(pieces_rows) * (n_batches["id_test"] + n_batches["ood"])


def test_small_work_budget_takes_fewer_rows_at_a_time_with_the_same_result(case):
    """A work budget of 2 float64 rows (as 5 rows of ResNet-50 in 1 GiB): the gradients of a
    loader batch are taken 2 samples at a time, the distance products 2 reference rows at
    a time, and the distances and cosines do not change."""
    model, layout, st, sets, rows, G, ag_path = case
    g, _, _ = power.read_basis(ag_path, "subspace")
    want_dist, want_cos = direct(G, sets, rows, full_basis(g, layout, "means"))
    sizes = []

    class SizeOp(PerSampleOperator):
        def gradients(self, x, timer=None):
            sizes.append(x.shape[0])
            return super().gradients(x, timer)

    fns = {ds: (lambda v=v: iter(batches(v[0], v[1], 16))) for ds, v in sets.items()}
    dist, cos, _ = gradient_pass_diagnostics(SizeOp(model, layout, st), fns, rows, "id_train",
                                             load_class_means(g, layout),
                                             work_bytes=2 * 8 * layout.num_params + 1)
    assert max(sizes) == 2 and sum(sizes) == sum(len(r) for r in rows.values())
    for ds in ("id_test", "ood"):
        np.testing.assert_allclose(dist[ds], want_dist[ds], rtol=1e-5, atol=1e-6)
    for ds in cos:
        np.testing.assert_allclose(cos[ds], want_cos[ds], rtol=1e-5, atol=1e-6)


def test_memory_limit_below_one_gradient_is_an_error(case):
    model, layout, st, sets, rows, _, _ = case
    fns = {ds: (lambda v=v: iter(batches(v[0], v[1], 16))) for ds, v in sets.items()}
    with pytest.raises(DataError, match="exceeds the gradient-diagnostics memory limit"):
        gradient_pass_diagnostics(PerSampleOperator(model, layout, st), fns, rows, "id_train",
                                  max_bytes=4 * layout.num_params - 1)
