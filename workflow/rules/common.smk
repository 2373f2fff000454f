# Helpers shared by the rule files (dataset names, shard lists, detector instances) and
# the JSON parameter blobs handed to the gradspace CLI. Every setting that changes a
# rule's output reaches it through `params`, so Snakemake's params trigger reruns
# exactly the invalidated jobs.

import json
import os
import shlex

from gradspace import __version__ as GRADSPACE_VERSION
from gradspace.params import attempt_scaled, export_runtime_settings
from gradspace.detectors.base import get_detector
from gradspace.errors import ConfigError
from gradspace.selection import ID_VAL, grid_candidates, split_grid, validation_sets
from gradspace.plan import data_parts as plan_data_parts, n_shards as plan_n_shards
from gradspace.versions import code_version

EXP = config["experiment"]
R = f"results/{EXP}"
LOGS = f"logs/{EXP}"
BENCH = f"{R}/benchmarks"
MODEL = f"{R}/model/model.pt"

ID_SETS = ["id_train", "id_test"]
OOD_SETS = list(config["data"]["ood"])
# the datasets of the test results (and of the diagnostics); the validation sets of
# hyperparameter selection (VAL_SETS, below) are prepared, extracted and projected alike
# but scored by the selection jobs only
TEST_DATASETS = ID_SETS + OOD_SETS


# What all rules repeat, in one place - the conda environment (relative to the rule
# files in workflow/rules/) and the resources of a job, which grow with each retry of a
# job that failed (SLURM kills for memory or time; profiles/slurm sets `retries`):
# gradspace.params.attempt_scaled.
CONDA_ENV = "../../envs/gradspace.yaml"



# The file that defines each subspace stage, whose rules are the stage (the timing
# tables sum their benchmarks; no rule name is written down twice).
STAGE_RULE_FILES = {"stats": "gradstats.smk", "pca": "pca.smk", "ag": "ag.smk"}


def stage_rules():
    """{stage: {"rules": names, "parallel": names}} from the rules this workflow defined;
    parallel rules are those with one job per data part ({part} in their output)."""
    out = {}
    for stage, fname in STAGE_RULE_FILES.items():
        rules = [r for r in workflow.rules if os.path.basename(str(r.snakefile)) == fname]
        out[stage] = {"rules": sorted(r.name for r in rules),
                      "parallel": sorted(r.name for r in rules if any("{part}" in str(f) for f in r.output))}
    return out


def jarg(obj):
    """A JSON blob, shell-quoted, for --params."""
    return shlex.quote(json.dumps(obj, sort_keys=True))


def n_shards(dataset):
    return plan_n_shards(config, dataset)


def shard_stores(dataset, kind="embeddings"):
    return [f"{R}/{kind}/{dataset}/shard-{k}.zarr" for k in range(n_shards(dataset))]


def _id_sources():
    idc = config["data"]["id"]
    if bool(idc.get("train")) != bool(idc.get("test")):
        raise ConfigError("data.id: give both 'train' and 'test' sources, or neither (then 'source' is split)")


_id_sources()


def prepare_params(dataset):
    data = config["data"]
    common = {
        "image_size": data["image_size"],
        "channels": data["channels"],
        "shards": n_shards(dataset),
    }
    if dataset in ID_SETS or dataset == ID_VAL:
        idc = data["id"]
        part = "test" if dataset == "id_test" else "train"
        separate = part in idc
        source = dict(idc[part] if separate else idc["source"])
        source.pop("shards", None)
        holdout = {"holdout": VALIDATION["id_holdout"]} if VAL_SETS and dataset != "id_test" else {}
        return {
            "role": dataset,
            "source": source,
            "num_classes": idc["num_classes"],
            "test_fraction": None if separate else idc["test_fraction"],
            "train_subsample": idc["train_subsample"] if dataset == "id_train" else None,
            "n": None,
            **holdout,
            **common,
        }
    source = dict(data["ood"][dataset] if dataset in OOD_SETS else VALIDATION["ood"][dataset])
    n = source.pop("n", None)
    source.pop("shards", None)
    return {"role": "ood", "source": source, "num_classes": None, "test_fraction": None,
            "train_subsample": None, "n": n, **common}


# Settings that change how fast a job runs but not what it writes (device, batch size,
# data-loader workers) reach the CLI through $GRADSPACE_RUNTIME instead of rule params,
# so changing them never reruns finished jobs. Every job (local or on SLURM) parses this
# file again, so the variable is set wherever a job runs.
export_runtime_settings(config["compute"])

# The shard count the config asks for each dataset, for the jobs' layout checks: a job
# that meets a manifest or shard stores written under another shard setting fails,
# naming the dataset and both counts (gradspace.data.manifest.check_shard_request,
# gradspace.store.check_shard_set), instead of mixing layouts.
import os as _os
from gradspace.params import SHARDS_ENV

# (set below, once the validation sets are known)


# Before the first job starts (main process only; not for dry runs), check every finished
# store of the experiment cheaply: completion record present, every recorded file present
# with its recorded size (one stat per file). A broken store stops the run with a message
# naming it; `gradspace verify-stores <results> --remove` removes such stores so that the
# next run rebuilds them. GRADSPACE_VERIFY_STORES=0 skips this check (jobs still check
# every store they open).
onstart:
    if _os.environ.get("GRADSPACE_VERIFY_STORES", "1") != "0" and _os.path.isdir(R):
        import time as _time
        from snakemake.exceptions import WorkflowError
        from snakemake.logging import logger
        from gradspace.store import find_stores, verify_stores

        _t0 = _time.perf_counter()
        _bad = verify_stores(R, full=False)
        if _bad:
            _msg = "\n".join(f"  {p}: {why}" for p, why in _bad)
            raise WorkflowError(
                f"{len(_bad)} store(s) under {R} are broken (truncated, missing files or "
                f"incomplete):\n{_msg}\nRemove them with `gradspace verify-stores {R} --remove` "
                "(add --quick to skip the full checksum pass), then run snakemake again with the "
                "`--forcerun <removed stores>` it prints: that rebuilds exactly them and reruns "
                "what depends on them.")
        logger.info(f"gradspace: {len(find_stores(R))} stores under {R} checked (sizes) in "
                    f"{_time.perf_counter() - _t0:.1f}s")


def compute_params():
    """Settings that change outputs: numeric precision and input normalization."""
    c = config["compute"]
    d = config["data"]
    return {"precision": c["precision"], "mean": d["mean"], "std": d["std"]}


def norm_params():
    """Input normalization, for commands that run the model over prepared images."""
    return {"mean": config["data"]["mean"], "std": config["data"]["std"]}


def train_params():
    """Everything that changes the trained model (device and workers come at run time)."""
    d = config["data"]
    return {
        "arch": config["model"]["arch"],
        "num_classes": d["id"]["num_classes"],
        "in_channels": d["channels"],
        "image_size": d["image_size"],
        "mean": d["mean"],
        "std": d["std"],
        "train": config["model"]["train"],
    }


def load_params():
    """Settings of an externally trained model (torchvision cache or checkpoint)."""
    d = config["data"]
    return {
        "arch": config["model"]["arch"],
        "weights": config["model"]["weights"],
        "num_classes": d["id"]["num_classes"],
        "in_channels": d["channels"],
        "image_size": d["image_size"],
    }


def _detector_table(section, where):
    table = {}
    for name, cfg in (section or {}).items():
        hparams, grid = split_grid(cfg, f"{where}.{name}")
        method = hparams.pop("method", name)
        cls = get_detector(method)  # ConfigError naming the unknown detector
        candidates = grid_candidates(hparams, grid)
        for cand in candidates:
            cls(**cand)  # ConfigError naming an unknown hyperparameter (of the grid too)
        table[name] = {
            "method": method,
            "hparams": hparams,
            "grid": grid,
            "candidates": candidates,
            "embedding": cls.embedding,
            "needs_model": bool(cls.needs_model),
            "needs_fit": bool(cls.needs_fit),
        }
    return table


DETECTORS = _detector_table(config["detectors"], "detectors")

# -- gradient subspace ---------------------------------------------------------------------
SUB = config["subspace"]
SPACES = list(SUB["types"]) if SUB["enabled"] else []
STATS = f"{R}/subspace/stats/stats.zarr"
THREADS = config["compute"]["threads"]
GRAD_DETECTORS = _detector_table(SUB["detectors"], "subspace.detectors") if SPACES else {}
ENSEMBLE_GRID = [float(a) for a in SUB["ensemble"].get("grid", {}).get("alpha", [])]

# -- hyperparameter selection on validation data (gradspace.selection) -----------------------
SELECTED = [n for n, d in DETECTORS.items() if d["grid"]]
SELECTED_GRAD = [n for n, d in GRAD_DETECTORS.items() if d["grid"]]
VAL_SETS = validation_sets(config)  # the same decision as `gradspace plan`
VAL_OOD = VAL_SETS[1:]
DATASETS = TEST_DATASETS + VAL_SETS
VALIDATION = config["validation"]
_os.environ[SHARDS_ENV] = json.dumps({ds: n_shards(ds) for ds in DATASETS}, sort_keys=True)


def _names_regex(names):
    return "|".join(names) if names else "__none__"


def _check_subspace_config():
    """Parse-time checks of the subspace settings that reach the jobs (issue 11)."""
    from snakemake.logging import logger
    from gradspace.detectors.gradient import check_dims

    # subspace.detectors' d (grad_react, grad_bats) against each space's dimension: an error
    # above subspace.k, capped with a warning above the AG dimension (C - 1 or C)
    # every grid candidate is checked; the same warning of several candidates is logged once
    seen = set()
    for n, d in GRAD_DETECTORS.items():
        for c in d["candidates"]:
            for msg in check_dims({n: {"method": d["method"], **c}}, SPACES, SUB["k"],
                                  config["data"]["id"]["num_classes"], centred=SUB["normalize"]["mean"],
                                  orthonormalize=SUB["ag"]["orthonormalize"]):
                if msg not in seen:
                    seen.add(msg)
                    logger.warning(f"gradspace: {msg}")


if SPACES:
    _check_subspace_config()

ENSEMBLE = [d for d in SUB["ensemble"]["detectors"] if d in GRAD_DETECTORS and d in DETECTORS]


def subspace_grad_params(stats=False):
    """Params of the subspace commands that run per-sample gradients."""
    p = {**norm_params(), "chunk_size": SUB["chunk_size"], "strategy": SUB["strategy"],
         "direction_chunk": SUB["direction_chunk"], "precision": config["compute"]["precision"]}
    if stats:  # the selection is fixed by the statistics; later commands read it from there
        p.update({"params": SUB["params"], "blocks": SUB["blocks"], "temperature": SUB["temperature"]})
    return p


def pca_init_params():
    return {"k": SUB["k"], "oversample": SUB["oversample"], "seed": config["seed"]}


# Parameter-block groups (subspace.block_jobs): one group (the default) runs every block
# in one job; with more, the PCA products and the projections run one job per block group
# (rules pca_gv, pca_pass_block, pca_lift per group, project_block, project_merge).
BLOCK_JOBS = SUB["block_jobs"]
BLOCK_GROUPS = [str(g) for g in (range(BLOCK_JOBS) if isinstance(BLOCK_JOBS, int) else BLOCK_JOBS)]
SPLIT_BLOCKS = len(BLOCK_GROUPS) > 1


def block_group_arg(group):
    """--block-group of one job: the whole grouping (checked by the CLI) and its group."""
    return jarg({"groups": BLOCK_JOBS, "group": group})


# -- PCA data passes ----------------------------------------------------------------------
PCA = f"{R}/subspace/pca"


# subspace.data_parts contiguous sets of ID-train shards (one job per set and pass)
DATA_PARTS = plan_data_parts(config)
DATA_PARTS_IDS = [str(i) for i in range(len(DATA_PARTS))]
LIFT_GROUPS = BLOCK_GROUPS if SPLIT_BLOCKS else ["all"]


def part_shards(part):
    return " ".join(str(int(s)) for s in DATA_PARTS[int(part)])


def pca_basis(it):
    t = int(it)
    return f"{PCA}/V-init.zarr" if t == 0 else f"{PCA}/pass-{t - 1:03d}/V-next.zarr"


def pca_krylov(t):
    return f"{PCA}/krylov/pass-{int(t):03d}.zarr"


def pca_pass_parts(it):
    t = int(it)
    if SPLIT_BLOCKS:
        return [f"{PCA}/pass-{t:03d}/group-{g}/part-{w}.zarr" for w in DATA_PARTS_IDS for g in BLOCK_GROUPS]
    return [f"{PCA}/pass-{t:03d}/part-{w}.zarr" for w in DATA_PARTS_IDS]


def pca_all_gv_parts(it):
    t = int(it)
    if not SPLIT_BLOCKS:
        return []
    return [f"{PCA}/pass-{t:03d}/gv/group-{g}/part-{w}.zarr" for w in DATA_PARTS_IDS for g in BLOCK_GROUPS]


def pca_previous_parts(it):
    """What the pass before ``it`` wrote for its reduce (released by the jobs of pass it)."""
    t = int(it)
    return [] if t == 0 else pca_pass_parts(t - 1) + pca_all_gv_parts(t - 1)


def release_arg(paths):
    return f"--release {' '.join(paths)}" if paths else ""


# AG class sums: one job per (class range, data part). A class range's job computes the
# gradients of its classes' samples only and writes only their P x C' columns, so the
# partials of one data part hold P x C in all, whatever subspace.ag.class_jobs; more
# class jobs bound each job's memory (P x C' accumulator) and spread the work over GPUs.
AG_CLASS_JOBS = max(1, min(int(SUB["ag"]["class_jobs"]), int(config["data"]["id"]["num_classes"])))
AG_CLASS_IDS = [str(c) for c in range(AG_CLASS_JOBS)]


def ag_partials():
    return [f"{R}/subspace/ag/partial/classes-{c}/part-{w}.zarr" for c in AG_CLASS_IDS for w in DATA_PARTS_IDS]


def ag_classes_arg(cgroup):
    return f"--classes {AG_CLASS_JOBS}/{int(cgroup)}" if AG_CLASS_JOBS > 1 else ""


def pca_gv_parts(wc):
    """The G_g·V_g parts of every block group for one (pass, data part)."""
    return [f"{PCA}/pass-{wc.it}/gv/group-{g}/part-{wc.part}.zarr" for g in BLOCK_GROUPS]


def _max_residual(path):
    with open(path) as fh:
        r = json.load(fh).get("max_residual")
    return float("inf") if r is None else float(r)


def pca_final_pass():
    """The pass whose Rayleigh–Ritz gives the PCA subspace: subspace.iterations (a fixed
    number of Krylov blocks), or with `auto` the first pass t >= 1 whose largest top-k
    residual meets subspace.tol, at most max_iterations (checkpoint: each pass's diagnostics
    decide whether the next pass is needed)."""
    its = SUB["iterations"]
    if its != "auto":
        return int(its)
    last = int(SUB["max_iterations"])
    for t in range(1, last + 1):
        diag = checkpoints.pca_diagnostics.get(it=f"{t:03d}").output[0]
        if _max_residual(diag) <= float(SUB["tol"]):
            return t
    return last


# -- PCA solver ------------------------------------------------------------------------------
# subspace.solver: exact / krylov / power are fixed at parse time. auto needs N (ID-train
# samples) and P (selected parameters), which only the gradient statistics know (the data
# are prepared and the model built by jobs), so the checkpoint pca_solver decides from them
# (gradspace.subspace.exact.choose_solver against subspace.exact_max_gib) and pca_finalize's
# inputs follow its decision: the store of pca_exact, or the lift of the data passes.
EXACT_MEM_MB = int(float(SUB["exact_max_gib"]) * 1024) + 4000


def pca_solver_used():
    """The solver of this run: subspace.solver, or with auto the checkpoint's decision."""
    if SUB["solver"] != "auto":
        return SUB["solver"]
    with open(checkpoints.pca_solver.get().output[0]) as fh:
        return json.load(fh)["solver"]


def pca_iterative_solver():
    """The solver the data passes run (auto falls back to krylov)."""
    return "power" if SUB["solver"] == "power" else "krylov"


def pca_settings_params():
    """What pca_settings records (an input of pca_finalize, so that its change reruns the
    finalize, which Snakemake's params check skips for checkpoint-dependent jobs). The
    exact path also depends on k and, with auto, on the budget; the iterative settings
    keep their old keys, so runs pinned to krylov/power are not invalidated."""
    keys = ["tol", "iterations", "max_iterations", "solver"]
    if SUB["solver"] in ("auto", "exact"):
        keys += ["k", "exact_max_gib"]
    return {k: SUB[k] for k in keys}


def pca_finalize_inputs(wc):
    base = {}  # settings and stats are the rule's static inputs
    if pca_solver_used() == "exact":
        return {**base, "exact": f"{PCA}/exact.zarr"}
    t = pca_final_pass()
    return {**base, "parts": [f"{PCA}/lift/group-{g}/part-{w}.zarr" for g in LIFT_GROUPS for w in DATA_PARTS_IDS],
            "krylov": pca_krylov(t), "diagnostics": [f"{PCA}/diagnostics/pass-{s:03d}.json" for s in range(t + 1)]}


def pca_finalize_args(wc, input):
    keys = set(input.keys())
    if "exact" in keys:
        return f"--exact {input.exact}"
    if "parts" not in keys:  # the checkpoint pca_solver is pending: evaluated again after it
        return ""
    return f"--parts {' '.join(input.parts)} --krylov {input.krylov} --diagnostics {' '.join(input.diagnostics)}"


def reduced_parts(wc):
    """The per-block-group projections of one (subspace, dataset, shard)."""
    return [f"{R}/reduced/{wc.space}/{wc.dataset}/group-{g}/shard-{wc.shard}.zarr" for g in BLOCK_GROUPS]


def reduced_args(space):
    return " ".join(f"--reduced {ds}=" + ",".join(shard_stores(ds, kind=f"reduced/{space}"))
                    for ds in TEST_DATASETS)


def gradient_diagnostics_args():
    args = [f"--ag {R}/subspace/ag/subspace.zarr"] if "ag" in SPACES else []
    args += [f"--data {ds}={R}/data/{ds}" for ds in TEST_DATASETS]
    args += [f"--reduced {sp}:{ds}=" + ",".join(shard_stores(ds, kind=f"reduced/{sp}"))
             for sp in SPACES for ds in TEST_DATASETS]
    return " ".join(args)


def detector_params(name):
    d = DETECTORS[name]
    return {"method": d["method"], "hparams": d["hparams"]}


def store_kind(detector):
    """Which shard stores a detector reads: the gradient pass's or the extraction's."""
    return "gradscores" if DETECTORS[detector]["method"] == "stored_grad_score" else "embeddings"


def grad_scores_params():
    g = config["gradients"]
    return {**norm_params(), "params": g["params"], "strategy": g["strategy"],
            "chunk_size": g["chunk_size"], "temperature": g["temperature"],
            "precision": config["compute"]["precision"], "scores": g["scores"],
            "seed": config["seed"]}


def grad_scores_inputs(wc):
    inputs = {"model": MODEL, "data": f"{R}/data/{wc.dataset}"}
    if any(s["kind"] == "batchgrad" for s in config["gradients"]["scores"].values()):
        inputs["ref"] = f"{R}/data/id_train"
    return inputs


def detector_regex(model_pass):
    """Regex of the detector instances that do (or do not) need a model pass to score."""
    names = [n for n, d in DETECTORS.items() if d["needs_model"] == model_pass]
    return "|".join(names) if names else "__none__"


def feature_score_files():
    return [f"{R}/scores/feature/{d}/{ds}.npy" for d in DETECTORS for ds in ["id_test"] + OOD_SETS]


def all_score_files():
    files = feature_score_files()
    for space in SPACES:
        for ds in ["id_test"] + OOD_SETS:
            files += [f"{R}/scores/{space}/{n}/{ds}.npy" for n in GRAD_DETECTORS]
            files += [f"{R}/scores/ensemble_{space}/{n}/{ds}.npy" for n in ENSEMBLE]
    return files


def detector_table_json():
    """Detector instance -> method and embedding, for metrics.csv and the paper tables.

    Gradient-space instances carry the paper's method name (grad_msp -> msp) so that
    the report can show each method with a Feature and a Gradient row (Table 3)."""
    table = {n: {"method": d["method"], "embedding": d["embedding"]} for n, d in DETECTORS.items()}
    for space in SPACES:
        for n, d in GRAD_DETECTORS.items():
            method = d["method"].removeprefix("grad_")
            table[f"{space}/{n}"] = {"method": method, "embedding": f"gradient ({space.upper()})"}
        for n in ENSEMBLE:
            method = GRAD_DETECTORS[n]["method"].removeprefix("grad_")
            table[f"ensemble_{space}/{n}"] = {"method": method,
                                             "embedding": f"ensemble ({space.upper()})"}
    return jarg(table)

def report_extra_inputs():
    if not SPACES:
        return []
    return ([f"{R}/timing", f"{R}/diagnostics/gradient"] + [f"{R}/diagnostics/{sp}" for sp in SPACES]
            + ([f"{R}/subspace/pca/subspace.zarr"] if "pca" in SPACES else []))


def report_sections():
    """Extra report tables: the paper's timing tables and the subspace diagnostics."""
    if not SPACES:
        return []
    sec = [
        {"title": "Table 11: subspace extraction time", "csv": f"{R}/timing/table11_subspace_time.csv",
         "caption": "Time of every job that built each subspace (normalization statistics, AG "
                    "class means or PCA power iterations), from the rules' benchmark files."},
        {"title": "Table 12: per-image detection time", "csv": f"{R}/timing/table12_detection_time.csv",
         "caption": "Per-image gradient (backward) and projection time from the projection jobs' "
                    "in-job timers, and prediction time of each gradient-space detector."},
    ]
    for sp in SPACES:
        d = f"{R}/diagnostics/{sp}"
        sec.append({"title": f"Reconstruction error ({sp.upper()}, paper Tables 2 and 8)",
                    "csv": f"{d}/reconstruction.csv",
                    "caption": "||G - G V V^T|| / ||G|| per dataset: ID gradients live in the subspace, "
                               "OOD gradients less so."})
        sec.append({"title": f"Explained variance ({sp.upper()}, paper Fig. 8)",
                    "image": f"{d}/explained_variance.png", "csv": f"{d}/explained_variance.csv"})
        if sp == "pca":
            iterative = (f"Largest relative residual ||C v - lambda v|| / lambda of the top-k Ritz pairs "
                         f"after each data pass ({pca_iterative_solver()} solver, iterations: "
                         f"{SUB['iterations']}); the run stops once it is below subspace.tol = "
                         f"{SUB['tol']}, then one more pass lifts the Ritz vectors.")
            exact = ("Exact solver: one data pass held the normalized gradients G in memory and the "
                     "exact eigendecomposition of G G^T gave the directions, so there is no "
                     "convergence curve: the single row is that pass, its residual is rounding only.")
            caption = {"exact": exact, "auto": (
                f"Solver auto: exact (in memory) when it fits subspace.exact_max_gib = "
                f"{SUB['exact_max_gib']} GiB, else the data passes; the figure title names the "
                f"solver used. {exact} {iterative}")}.get(SUB["solver"], iterative)
            sec.append({"title": "PCA convergence", "image": f"{d}/convergence.png",
                        "csv": f"{d}/convergence.csv", "caption": caption})
            sec.append({"title": "PCA directions and their residuals", "csv": f"{d}/directions.csv",
                        "caption": "Each direction of the PCA basis: eigenvalue (per sample), residual, and "
                                   "whether it met subspace.tol (NO marks an unconverged direction: the basis "
                                   "is then not the PCA subspace to that accuracy)."})
    g = f"{R}/diagnostics/gradient"
    sec.append({"title": "Nearest-neighbour distances, whole vs reduced space (paper Table 9)",
                "csv": f"{g}/nn_distances.csv"})
    sec.append({"title": "Cosine to the class-mean gradient (paper Table 13)",
                "csv": f"{g}/class_mean_cosine.csv"})
    return sec


# -- hyperparameter selection: file names and arguments (rules in selection.smk) -------------
SEL = f"{R}/selection"
VALIDATED = f"{SEL}/validation-disjoint.json"


def candidates(space, name):
    """The grid candidates of one instance (feature space or a gradient space)."""
    table = DETECTORS if space == "feature" else GRAD_DETECTORS
    return table[name]["candidates"]


def candidate_fitted(space, name):
    return [f"{SEL}/{space}/{name}/cand-{i}.npz" for i in range(len(candidates(space, name)))]


def candidate_scores(space, name):
    return [f"{SEL}/{space}/{name}/cand-{i}/{ds}.npy"
            for i in range(len(candidates(space, name))) for ds in VAL_SETS]


def candidate_scores_arg(space, name):
    """--scores I=PATH for the select command (I: the candidate of each file)."""
    n = len(candidates(space, name))
    return " ".join(f"{i}={SEL}/{space}/{name}/cand-{i}/{ds}.npy" for i in range(n) for ds in VAL_SETS)


def selection_args():
    """Settings every selection job shares."""
    return (f"--ood {' '.join(VAL_OOD)} --criterion {' '.join(VALIDATION['criterion'])} "
            f"--positive {config['metrics']['positive']}")


def selection_records():
    recs = [f"{SEL}/feature/{n}.json" for n in SELECTED]
    recs += [f"{SEL}/{sp}/{n}.json" for sp in SPACES for n in SELECTED_GRAD]
    if ENSEMBLE_GRID:
        recs += [f"{SEL}/ensemble_{sp}/{n}.json" for sp in SPACES for n in ENSEMBLE]
    return recs


SELECTION_SECTION = [
    {
        "title": "Hyperparameter selection on validation data",
        "csv": f"{R}/selection.csv",
        "caption": "Every grid candidate of the detectors that declare a grid, fitted on ID train and "
        "scored on the validation sets only (id_val, held out of the ID-train pool, against the "
        "validation OOD sets, never test sets); val_* are averages over the validation OOD sets, "
        "'chosen' marks the candidate picked by the criterion, the only one scored on the test sets.",
    }
] if VAL_SETS else []
