# The paper's detectors on the reduced gradients (fit on ID train, score every dataset)
# and their ensemble with the feature-space detectors.


rule fit_grad_detector:
    input:
        lambda wc: shard_stores("id_train", kind=f"reduced/{wc.space}"),
    output:
        f"{R}/detectors/{{space}}/{{gdetector}}.npz",
    wildcard_constraints:
        gdetector=_names_regex([n for n in GRAD_DETECTORS if n not in SELECTED_GRAD]),  # grids: selection.smk
    params:
        code=code_version("detectors"),
        method=lambda wc: GRAD_DETECTORS[wc.gdetector]["method"],
        hparams=lambda wc: jarg(GRAD_DETECTORS[wc.gdetector]["hparams"]),
        seed=config["seed"],
    log:
        f"{LOGS}/fit/{{space}}/{{gdetector}}.log",
    benchmark:
        f"{BENCH}/fit/{{space}}/{{gdetector}}.tsv"
    resources:
        **attempt_scaled(mem_mb=8000, runtime=60),
    conda:
        CONDA_ENV
    shell:
        "gradspace fit --method {params.method} --name {wildcards.gdetector} --params {params.hparams} "
        "--space {wildcards.space} --embedding gradient --train {input} --seed {params.seed} "
        "--out {output} > {log} 2>&1"


rule score_grad_detector:
    input:
        fitted=f"{R}/detectors/{{space}}/{{gdetector}}.npz",
        shards=lambda wc: shard_stores(wc.dataset, kind=f"reduced/{wc.space}"),
    output:
        f"{R}/scores/{{space}}/{{gdetector}}/{{dataset}}.npy",
    params:
        code=code_version("detectors"),
    log:
        f"{LOGS}/score/{{space}}/{{gdetector}}/{{dataset}}.log",
    benchmark:
        f"{BENCH}/score/{{space}}/{{gdetector}}/{{dataset}}.tsv"
    resources:
        **attempt_scaled(mem_mb=8000, runtime=60),
    conda:
        CONDA_ENV
    shell:
        "gradspace score --fitted {input.fitted} --shards {input.shards} --out {output} > {log} 2>&1"


rule ensemble:
    input:
        feature=f"{R}/scores/feature/{{gdetector}}/{{dataset}}.npy",
        gradient=f"{R}/scores/{{space}}/{{gdetector}}/{{dataset}}.npy",
        alpha=lambda wc: [f"{SEL}/ensemble_{wc.space}/{wc.gdetector}.json"] if ENSEMBLE_GRID else [],
    output:
        f"{R}/scores/ensemble_{{space}}/{{gdetector}}/{{dataset}}.npy",
    params:
        code=code_version("detectors"),
        alpha=config["subspace"]["ensemble"]["alpha"],
    log:
        f"{LOGS}/score/ensemble_{{space}}/{{gdetector}}/{{dataset}}.log",
    benchmark:
        f"{BENCH}/ensemble/{{space}}/{{gdetector}}/{{dataset}}.tsv"
    resources:
        **attempt_scaled(mem_mb=2000, runtime=10),
    conda:
        CONDA_ENV
    shell:
        "gradspace ensemble-scores --feature {input.feature} --gradient {input.gradient} "
        + ("--alpha-file {input.alpha}" if ENSEMBLE_GRID else "--alpha {params.alpha}")
        + " --out {output} > {log} 2>&1"
