# One job per detector fit (on ID train) and per (detector, dataset) score.
# Array detectors read the embedding stores; model-pass detectors (ODIN, BATS) run the
# model over the prepared images.


rule fit_detector:
    input:
        model=MODEL,
        data=f"{R}/data/id_train",
        shards=shard_stores("id_train"),
    output:
        f"{R}/detectors/feature/{{detector}}.npz",
    wildcard_constraints:
        detector=_names_regex([n for n in DETECTORS if n not in SELECTED]),  # grids: select_detector
    params:
        code=code_version("detectors"),
        method=lambda wc: DETECTORS[wc.detector]["method"],
        hparams=lambda wc: jarg(DETECTORS[wc.detector]["hparams"]),
        compute=jarg(norm_params()),
        seed=config["seed"],
    log:
        f"{LOGS}/fit/feature/{{detector}}.log",
    benchmark:
        f"{BENCH}/fit/feature/{{detector}}.tsv"
    resources:
        **attempt_scaled(mem_mb=8000, runtime=60),
    conda:
        CONDA_ENV
    shell:
        "gradspace fit --method {params.method} --name {wildcards.detector} --params {params.hparams} --space feature "
        "--train {input.shards} --model {input.model} --data-dir {input.data} "
        "--compute {params.compute} --seed {params.seed} --out {output} > {log} 2>&1"


rule score_detector:
    input:
        fitted=f"{R}/detectors/feature/{{detector}}.npz",
        shards=lambda wc: shard_stores(wc.dataset, kind=store_kind(wc.detector)),
    output:
        f"{R}/scores/feature/{{detector}}/{{dataset}}.npy",
    wildcard_constraints:
        detector=detector_regex(model_pass=False),
    params:
        code=code_version("detectors"),
    log:
        f"{LOGS}/score/feature/{{detector}}/{{dataset}}.log",
    benchmark:
        f"{BENCH}/score/feature/{{detector}}/{{dataset}}.tsv"
    resources:
        **attempt_scaled(mem_mb=8000, runtime=60),
    conda:
        CONDA_ENV
    shell:
        "gradspace score --fitted {input.fitted} --shards {input.shards} --out {output} > {log} 2>&1"


rule score_model_detector:
    input:
        fitted=f"{R}/detectors/feature/{{detector}}.npz",
        model=MODEL,
        data=f"{R}/data/{{dataset}}",
    output:
        f"{R}/scores/feature/{{detector}}/{{dataset}}.npy",
    wildcard_constraints:
        detector=detector_regex(model_pass=True),
    params:
        code=code_version("detectors"),
        compute=jarg(norm_params()),
    log:
        f"{LOGS}/score/feature/{{detector}}/{{dataset}}.log",
    benchmark:
        f"{BENCH}/score/feature/{{detector}}/{{dataset}}.tsv"
    threads: THREADS
    resources:
        **attempt_scaled(mem_mb=8000, runtime=60),
    conda:
        CONDA_ENV
    shell:
        "GRADSPACE_THREADS={threads} gradspace score --fitted {input.fitted} --model {input.model} "
        "--data-dir {input.data} --params {params.compute} --out {output} > {log} 2>&1"
