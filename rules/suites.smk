# Offline suites built here (builders mini-*): data, pretraining, experts; and every suite's
# calibration sets, every task's set of one budget in one job (drawing a set costs less than starting
# a process). Pretraining uses every core; experts train with `threads` each, several at once
# (on 2 cores, two 1-thread fine-tunings finish sooner than two 2-thread ones in turn), and each
# expert is evaluated in the job that trained it (`evaluate_in_producer`, rules/common.smk). Built
# experts are cached like any output.


rule suite_data:
    wildcard_constraints:
        suite=one_of(OFFLINE_SUITES),
    input:
        suite_config=suite_config_files,
    output:
        directory("results/{suite}/data"),
    params:
        suite_config=lambda w: suite_config_path(w.suite),
    conda:
        "../environment.yml"
    log:
        "logs/{suite}/suite_data.log",
    benchmark:
        "benchmarks/{suite}/suite_data.tsv"
    shell:
        "python -m epmq suite data --suite-config {params.suite_config:q} --out {output:q} > {log:q} 2>&1"


rule suite_pretrain:
    wildcard_constraints:
        suite=one_of(OFFLINE_SUITES),
    input:
        suite_config=suite_config_files,
        data="results/{suite}/data",
    output:
        directory("results/{suite}/pretrained"),
    params:
        suite_config=lambda w: suite_config_path(w.suite),
    # every core of a local run; a cluster run has no core count (no --cores: `workflow.cores` would
    # stop it at parse time), so there the suite's `threads`, which the SLURM profile's set-threads raises
    threads: workflow.resource_settings.cores or config["threads"]
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../environment.yml"
    log:
        "logs/{suite}/suite_pretrain.log",
    benchmark:
        "benchmarks/{suite}/suite_pretrain.tsv"
    shell:
        "python -m epmq suite pretrain --suite-config {params.suite_config:q} --data {input.data:q} --out {output:q} > {log:q} 2>&1"


rule suite_finetune:
    wildcard_constraints:
        suite=one_of(OFFLINE_SUITES),
    input:
        suite_config=suite_config_files,
        data="results/{suite}/data",
        pretrained="results/{suite}/pretrained",
    # what evaluating an expert reads is already here: config, data, pretrained heads and, in
    # mini-text4, the expert's own head (not the other experts: they would make a cycle)
    output:
        model=directory("results/{suite}/experts/{task}"),
        **evaluated_here("experts/{task}"),
    params:
        suite_config=lambda w: suite_config_path(w.suite),
        then_evaluate=then_evaluate,
    threads: config["threads"]
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../environment.yml"
    log:
        "logs/{suite}/suite_finetune/{task}.log",
    benchmark:
        "benchmarks/{suite}/suite_finetune/{task}.tsv"
    shell:
        "python -m epmq suite finetune --suite-config {params.suite_config:q} --data {input.data:q}"
        " --pretrained {input.pretrained:q} --task {wildcards.task:q} --threads {threads} --out {output.model:q}"
        " {params.then_evaluate} > {log:q} 2>&1"


rule suite_calib:
    input:
        suite_config=suite_config_files,
        data="results/{suite}/data",
        pretrained="results/{suite}/pretrained",
    output:
        directory("results/{suite}/calib/n{samples}-s{seed}"),
    params:
        suite_config=lambda w: suite_config_path(w.suite),
        tasks=lambda w: tasks(w.suite),
    conda:
        "../environment.yml"
    log:
        "logs/{suite}/suite_calib/n{samples}-s{seed}.log",
    benchmark:
        "benchmarks/{suite}/suite_calib/n{samples}-s{seed}.tsv"
    shell:
        "python -m epmq suite calib --suite-config {params.suite_config:q} --data {input.data:q} --tasks {params.tasks:q}"
        " --suite-dir results/{wildcards.suite:q}"
        " --samples {wildcards.samples:q} --seed {wildcards.seed:q} --out {output:q} > {log:q} 2>&1"
