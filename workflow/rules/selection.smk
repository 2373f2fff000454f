# Hyperparameter selection on validation data (gradspace.selection). A detector instance
# with a `grid` gets one fit per grid candidate (on ID train, as the instance's own fit),
# each scored on the validation sets only; select_* choose by validation.criterion and copy
# the chosen candidate's fitted detector to the path the test scoring reads, so the test
# sets are only ever scored with the chosen hyperparameters. Changing one detector's grid
# reruns that detector's candidates, its selection and its test scores, nothing else.


rule check_validation:
    input:
        expand(f"{R}/data/{{dataset}}", dataset=DATASETS),
    output:
        VALIDATED,
    params:
        code=code_version("selection"),
        val=" ".join(f"{ds}={R}/data/{ds}" for ds in VAL_SETS),
        test=" ".join(f"{ds}={R}/data/{ds}" for ds in TEST_DATASETS),
    log:
        f"{LOGS}/selection/check_validation.log",
    benchmark:
        f"{BENCH}/selection/check_validation.tsv"
    resources:
        **attempt_scaled(mem_mb=2000, runtime=10),
    conda:
        CONDA_ENV
    shell:
        "gradspace check-validation --validation {params.val} --test {params.test} --out {output} > {log} 2>&1"


use rule fit_detector as fit_candidate with:
    output:
        f"{SEL}/feature/{{detector}}/cand-{{cand}}.npz",
    wildcard_constraints:
        detector=_names_regex(SELECTED),
        cand=r"\d+",
    params:
        code=code_version("detectors"),
        method=lambda wc: DETECTORS[wc.detector]["method"],
        hparams=lambda wc: jarg(candidates("feature", wc.detector)[int(wc.cand)]),
        compute=jarg(norm_params()),
        seed=config["seed"],
    log:
        f"{LOGS}/selection/fit/feature/{{detector}}/cand-{{cand}}.log",
    benchmark:
        f"{BENCH}/selection/fit/feature/{{detector}}/cand-{{cand}}.tsv"


use rule score_detector as score_candidate with:
    input:
        fitted=f"{SEL}/feature/{{detector}}/cand-{{cand}}.npz",
        shards=lambda wc: shard_stores(wc.dataset, kind=store_kind(wc.detector)),
    output:
        f"{SEL}/feature/{{detector}}/cand-{{cand}}/{{dataset}}.npy",
    wildcard_constraints:
        detector=_names_regex([n for n in SELECTED if not DETECTORS[n]["needs_model"]]),
        dataset=_names_regex(VAL_SETS),
        cand=r"\d+",
    log:
        f"{LOGS}/selection/score/feature/{{detector}}/cand-{{cand}}/{{dataset}}.log",
    benchmark:
        f"{BENCH}/selection/score/feature/{{detector}}/cand-{{cand}}/{{dataset}}.tsv"


use rule score_model_detector as score_model_candidate with:
    input:
        fitted=f"{SEL}/feature/{{detector}}/cand-{{cand}}.npz",
        model=MODEL,
        data=f"{R}/data/{{dataset}}",
    output:
        f"{SEL}/feature/{{detector}}/cand-{{cand}}/{{dataset}}.npy",
    wildcard_constraints:
        detector=_names_regex([n for n in SELECTED if DETECTORS[n]["needs_model"]]),
        dataset=_names_regex(VAL_SETS),
        cand=r"\d+",
    log:
        f"{LOGS}/selection/score/feature/{{detector}}/cand-{{cand}}/{{dataset}}.log",
    benchmark:
        f"{BENCH}/selection/score/feature/{{detector}}/cand-{{cand}}/{{dataset}}.tsv"


rule select_detector:
    input:
        validated=VALIDATED,
        fitted=lambda wc: candidate_fitted("feature", wc.detector),
        scores=lambda wc: candidate_scores("feature", wc.detector),
    output:
        fitted=f"{R}/detectors/feature/{{detector}}.npz",
        record=f"{SEL}/feature/{{detector}}.json",
    wildcard_constraints:
        detector=_names_regex(SELECTED),
    params:
        code=code_version("selection"),
        candidates=lambda wc: jarg(candidates("feature", wc.detector)),
        scores=lambda wc: candidate_scores_arg("feature", wc.detector),
        common=selection_args(),
        name=lambda wc: wc.detector,
        space="feature",
    log:
        f"{LOGS}/selection/select/feature/{{detector}}.log",
    benchmark:
        f"{BENCH}/selection/select/feature/{{detector}}.tsv"
    resources:
        **attempt_scaled(mem_mb=4000, runtime=10),
    conda:
        CONDA_ENV
    shell:
        "gradspace select --name {params.name} --space {params.space} {params.common} "
        "--candidates {params.candidates} --fitted {input.fitted} --scores {params.scores} "
        "--out-fitted {output.fitted} --out {output.record} > {log} 2>&1"


use rule fit_grad_detector as fit_grad_candidate with:
    output:
        f"{SEL}/{{space}}/{{gdetector}}/cand-{{cand}}.npz",
    wildcard_constraints:
        gdetector=_names_regex(SELECTED_GRAD),
        cand=r"\d+",
    params:
        code=code_version("detectors"),
        method=lambda wc: GRAD_DETECTORS[wc.gdetector]["method"],
        hparams=lambda wc: jarg(candidates(wc.space, wc.gdetector)[int(wc.cand)]),
        seed=config["seed"],
    log:
        f"{LOGS}/selection/fit/{{space}}/{{gdetector}}/cand-{{cand}}.log",
    benchmark:
        f"{BENCH}/selection/fit/{{space}}/{{gdetector}}/cand-{{cand}}.tsv"


use rule score_grad_detector as score_grad_candidate with:
    input:
        fitted=f"{SEL}/{{space}}/{{gdetector}}/cand-{{cand}}.npz",
        shards=lambda wc: shard_stores(wc.dataset, kind=f"reduced/{wc.space}"),
    output:
        f"{SEL}/{{space}}/{{gdetector}}/cand-{{cand}}/{{dataset}}.npy",
    wildcard_constraints:
        gdetector=_names_regex(SELECTED_GRAD),
        dataset=_names_regex(VAL_SETS),
        cand=r"\d+",
    log:
        f"{LOGS}/selection/score/{{space}}/{{gdetector}}/cand-{{cand}}/{{dataset}}.log",
    benchmark:
        f"{BENCH}/selection/score/{{space}}/{{gdetector}}/cand-{{cand}}/{{dataset}}.tsv"


use rule select_detector as select_grad_detector with:
    input:
        validated=VALIDATED,
        fitted=lambda wc: candidate_fitted(wc.space, wc.gdetector),
        scores=lambda wc: candidate_scores(wc.space, wc.gdetector),
    output:
        fitted=f"{R}/detectors/{{space}}/{{gdetector}}.npz",
        record=f"{SEL}/{{space}}/{{gdetector}}.json",
    wildcard_constraints:
        gdetector=_names_regex(SELECTED_GRAD),
    params:
        code=code_version("selection"),
        candidates=lambda wc: jarg(candidates(wc.space, wc.gdetector)),
        scores=lambda wc: candidate_scores_arg(wc.space, wc.gdetector),
        common=selection_args(),
        name=lambda wc: wc.gdetector,
        space=lambda wc: wc.space,
    log:
        f"{LOGS}/selection/select/{{space}}/{{gdetector}}.log",
    benchmark:
        f"{BENCH}/selection/select/{{space}}/{{gdetector}}.tsv"


rule select_ensemble_alpha:
    input:
        validated=VALIDATED,
        feature=lambda wc: [f"{R}/scores/feature/{wc.gdetector}/{ds}.npy" for ds in VAL_SETS],
        gradient=lambda wc: [f"{R}/scores/{wc.space}/{wc.gdetector}/{ds}.npy" for ds in VAL_SETS],
    output:
        f"{SEL}/ensemble_{{space}}/{{gdetector}}.json",
    params:
        code=code_version("selection"),
        grid=" ".join(str(a) for a in ENSEMBLE_GRID),
        common=selection_args(),
    log:
        f"{LOGS}/selection/select/ensemble_{{space}}/{{gdetector}}.log",
    benchmark:
        f"{BENCH}/selection/select/ensemble_{{space}}/{{gdetector}}.tsv"
    resources:
        **attempt_scaled(mem_mb=2000, runtime=10),
    conda:
        CONDA_ENV
    shell:
        "gradspace select-alpha --name {wildcards.gdetector} --space ensemble_{wildcards.space} "
        "{params.common} --grid {params.grid} --feature {input.feature} --gradient {input.gradient} "
        "--out {output} > {log} 2>&1"


rule selection_table:
    input:
        selection_records(),
    output:
        f"{R}/selection.csv",
    params:
        code=code_version("selection"),
    log:
        f"{LOGS}/selection/table.log",
    benchmark:
        f"{BENCH}/selection/table.tsv"
    resources:
        **attempt_scaled(mem_mb=2000, runtime=10),
    conda:
        CONDA_ENV
    shell:
        "gradspace selection-table --records {input} --out {output} > {log} 2>&1"
