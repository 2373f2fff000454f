"""``gradspace`` commands of ``gradspace.subspace.jobs``: argument parsing only; each command
calls the library function it names."""

from __future__ import annotations

from ..subspace.jobs import (
    cmd_ag_partial,
    cmd_ag_reduce,
    cmd_ensemble,
    cmd_gradient_diagnostics,
    cmd_gradstats_partial,
    cmd_gradstats_reduce,
    cmd_pca_diagnostics,
    cmd_pca_exact,
    cmd_pca_finalize,
    cmd_pca_gv,
    cmd_pca_init,
    cmd_pca_lift,
    cmd_pca_pass,
    cmd_pca_reduce,
    cmd_pca_settings,
    cmd_pca_solver,
    cmd_project,
    cmd_project_merge,
    cmd_subspace_diagnostics,
)
from . import json_arg


def register(subparsers) -> None:
    def add(name, func, help_):
        p = subparsers.add_parser(name, help=help_)
        p.set_defaults(func=func)
        return p

    def compute(p, extra=""):
        p.add_argument("--params", type=json_arg, default={},
                       help="JSON: device, batch_size, num_workers, mean, std, chunk_size, strategy, "
                            "direction_chunk" + extra)
        p.add_argument("--timing", default=None, help="write in-job timers (JSON)")
        p.set_defaults(runtime_into=("params",))

    def block_group(p):
        p.add_argument("--block-group", type=json_arg, default=None,
                       help='JSON {"groups": n | {name: [blocks]}, "group": index | name}: the blocks '
                            "of one group of subspace.block_jobs (instead of --blocks)")

    p = add("gradstats-partial", cmd_gradstats_partial, "sums of ∇E and ∇E² over some shards "
                                                        "(normalization stats)")
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--shards", type=int, nargs="+", required=True, help="ID-train shards of this data part")
    p.add_argument("--out", required=True, help="partial sums .npz")
    compute(p, "; params (selection), blocks, temperature")

    p = add("gradstats-reduce", cmd_gradstats_reduce, "reduce partial sums to M and diag(I)^(-1/2)")
    p.add_argument("--partials", nargs="+", required=True)
    p.add_argument("--params", type=json_arg, default={},
                   help='JSON {"normalize": {"mean": true, "scale": "second_moment", "var_floor": 1e-8}}')
    p.add_argument("--out", required=True, help="stats.zarr")

    p = add("ag-partial", cmd_ag_partial, "class sums of G over some shards (average-gradient subspace)")
    for opt in ("--model", "--data-dir", "--stats"):
        p.add_argument(opt, required=True)
    p.add_argument("--shards", type=int, nargs="+", required=True, help="ID-train shards of this data part")
    p.add_argument("--classes", default=None,
                   help="JOBS/INDEX: only the classes of AG job INDEX of JOBS (subspace.ag.class_jobs): "
                        "gradients of their samples only, P x (their classes) columns written")
    p.add_argument("--out", required=True)
    compute(p, "; method (jvp_vjp|persample), num_classes")

    p = add("ag-reduce", cmd_ag_reduce, "class means of G -> AG subspace store")
    p.add_argument("--partials", nargs="+", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--params", type=json_arg, default={}, help='JSON {"orthonormalize": true}')
    p.add_argument("--release", nargs="+", default=None,
                   help="temporary inputs to delete once the AG store is written (the partials)")
    p.add_argument("--out", required=True)

    p = add("pca-init", cmd_pca_init, "seeded random orthonormal V_0 (k + oversample columns)")
    p.add_argument("--stats", required=True)
    p.add_argument("--params", type=json_arg, default={},
                   help='JSON {"k": K, "oversample": n, "seed": s}, all required '
                        '(subspace.k, subspace.oversample, seed)')
    p.add_argument("--out", required=True)

    def shards(p):
        p.add_argument("--shards", type=int, nargs="+", required=True,
                       help="ID-train shards of this data part (one job passes over all of them)")

    def release(p):
        p.add_argument("--release", nargs="*", default=[],
                       help="temporary outputs whose consumers are done: deleted (see io.release_consumed)")

    def data_part_job(p, inputs, blocks_help="comma-separated parameter blocks (default all)"):
        """Required inputs, the data part's shards, the job's parameter blocks (or block
        group) and the consumed outputs it releases: what every pass-like job takes."""
        for opt in inputs:
            p.add_argument(opt, required=True)
        shards(p)
        p.add_argument("--blocks", default=None, help=blocks_help)
        block_group(p)
        release(p)

    p = add("pca-pass", cmd_pca_pass, "one data pass over some shards: C·V_t = Gᵀ(G V_t) and the "
                                      "sample-space images G·V_t")
    data_part_job(p, ("--model", "--data-dir", "--stats", "--basis"),
                  "comma-separated parameter blocks of the output (default all)")
    p.add_argument("--gv", nargs="+", default=None,
                   help="pca-gv parts of these shards (every block group): compute G_bᵀ(G·V) from "
                        "them instead of loading V")
    p.add_argument("--out", required=True)
    compute(p, "; method (persample|jvp_vjp)")

    p = add("pca-gv", cmd_pca_gv, "G_g·V_g over the parameter blocks of one group for some shards "
                                  "(phase 1 of a block-group pca-pass)")
    data_part_job(p, ("--model", "--data-dir", "--stats", "--basis"))
    p.add_argument("--out", required=True)
    compute(p, "; method (persample|jvp_vjp)")

    p = add("pca-reduce", cmd_pca_reduce, "after pass t: sum the parts, orthonormalize (TSQR) -> "
                                          "V_{t+1}; Krylov record and Rayleigh–Ritz diagnostics of pass t")
    p.add_argument("--parts", nargs="+", required=True, help="pca-pass outputs of pass t")
    p.add_argument("--gv", nargs="*", default=None, help="pca-gv parts of pass t (block groups)")
    p.add_argument("--krylov", nargs="*", default=[], help="Krylov records of passes 0..t-1, in order")
    p.add_argument("--stats", required=True)
    p.add_argument("--params", type=json_arg, default={}, help='JSON {"solver": "krylov"|"power"}')
    p.add_argument("--out-basis", required=True, help="V_{t+1} store")
    p.add_argument("--out-krylov", required=True, help="Krylov record of pass t")
    p.add_argument("--diagnostics", default=None, help="also write the diagnostics JSON of pass t")
    release(p)

    p = add("pca-lift", cmd_pca_lift, "the final pass: PCA directions V = Gᵀ L of the Ritz pairs "
                                      "(some shards, optionally one block group)")
    data_part_job(p, ("--model", "--data-dir", "--stats", "--krylov"))
    p.add_argument("--out", required=True)
    compute(p, "; method (persample|jvp_vjp)")

    p = add("pca-diagnostics", cmd_pca_diagnostics, "diagnostics JSON of one pass from its Krylov record")
    p.add_argument("--krylov", required=True)
    p.add_argument("--out", required=True)

    p = add("pca-settings", cmd_pca_settings, "record the PCA's stopping settings (tol, iterations)")
    p.add_argument("--params", type=json_arg, default={})
    p.add_argument("--out", required=True)

    p = add("pca-finalize", cmd_pca_finalize, "sum the lift parts -> PCA subspace store (or install "
                                              "the store of pca-exact, --exact)")
    p.add_argument("--parts", nargs="+", default=None, help="pca-lift outputs")
    p.add_argument("--krylov", default=None, help="Krylov record of the final pass")
    p.add_argument("--exact", default=None, help="the store pca-exact wrote (moved into place)")
    p.add_argument("--diagnostics", nargs="*", default=[], help="diagnostics JSON of every pass (the curve)")
    p.add_argument("--stats", required=True)
    p.add_argument("--params", type=json_arg, default={}, help='JSON {"tol": 0.01}')
    p.add_argument("--out", required=True)

    p = add("pca-solver", cmd_pca_solver, "subspace.solver auto: exact when the in-memory PCA fits "
                                          "subspace.exact_max_gib, else krylov (JSON)")
    p.add_argument("--stats", required=True)
    p.add_argument("--params", type=json_arg, default={},
                   help='JSON {"solver": "auto", "k": K, "exact_max_gib": GiB}, all required')
    p.add_argument("--out", required=True)

    p = add("pca-exact", cmd_pca_exact, "the PCA subspace in one data pass: G in memory, exact "
                                        "eigendecomposition of GG^T (all ID-train shards)")
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--stats", required=True)
    shards(p)
    p.add_argument("--out", required=True)
    compute(p, "; k, exact_max_gib (the job's memory budget: refuses to start above it), tol "
               "(these three required)")

    p = add("project", cmd_project, "reduced gradients G·V of one shard")
    for opt in ("--model", "--data-dir", "--stats", "--subspace"):
        p.add_argument(opt, required=True)
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--blocks", default=None, help="comma-separated parameter blocks (default all)")
    block_group(p)
    release(p)
    p.add_argument("--out", required=True)
    compute(p, "; method (persample|jvp_vjp), space")

    p = add("project-merge", cmd_project_merge, "sum block parts of reduced gradients")
    p.add_argument("--parts", nargs="+", required=True)
    p.add_argument("--subspace", required=True)
    p.add_argument("--out", required=True)

    p = add("subspace-diagnostics", cmd_subspace_diagnostics,
            "reconstruction errors and explained-variance curve from stores")
    p.add_argument("--subspace", required=True)
    p.add_argument("--reduced", action="append", default=[], metavar="DATASET=STORE[,STORE...]")
    p.add_argument("--space", default=None)
    p.add_argument("--out-dir", required=True)

    p = add("gradient-diagnostics", cmd_gradient_diagnostics,
            "NN distances whole vs reduced space, cosine to class-mean gradient")
    p.add_argument("--model", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--ag", default=None, help="AG subspace store (class means)")
    p.add_argument("--data", action="append", default=[], metavar="DATASET=DIR")
    p.add_argument("--reduced", action="append", default=[], metavar="SPACE:DATASET=STORE[,STORE...]")
    p.add_argument("--out-dir", required=True)
    compute(p, "; n_samples (1000), seed, max_gib (memory for the ID-train reference gradients of the "
               "whole-space NN search; more is split into pieces, one more query pass each)")

    p = add("ensemble-scores", cmd_ensemble, "S_f + alpha*S_b (paper eq. 11)")
    p.add_argument("--feature", required=True, help="feature-space scores .npy")
    p.add_argument("--gradient", required=True, help="gradient-space scores .npy")
    a = p.add_mutually_exclusive_group(required=True)
    a.add_argument("--alpha", type=float, help="the weight alpha (subspace.ensemble.alpha)")
    a.add_argument("--alpha-file", help="selection record of `gradspace select-alpha`: its chosen alpha")
    p.add_argument("--out", required=True)
