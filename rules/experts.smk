# Paper-scale suites (builders hub-*): pretrained models, experts and datasets come from the hub
# (or from local folders named in config/experts.tsv and the suite YAML's `datasets:`). These jobs
# run on the machine that runs Snakemake (localrules): compute nodes often have no internet.
# Every fetch records the commit its revision resolved to (fetch.json). Models land once in the
# store (resources/models/<owner--name@revision>, one per model and revision, locked per model) and
# are linked into each suite. `hub_fetch` caps concurrent downloads on the login node: set its
# limit with `--resources hub_fetch=N` or a profile's `resources:` (unset: no cap).


localrules:
    hub_data,
    hub_pretrained,
    hub_expert,


rule hub_data:
    wildcard_constraints:
        suite=one_of(HUB_SUITES),
    input:
        suite_config=suite_config_files,
    resources:
        hub_fetch=1,
    output:
        directory("results/{suite}/data"),
    params:
        suite_config=lambda w: suite_config_path(w.suite),
    conda:
        "../environment.yml"
    log:
        "logs/{suite}/hub_data.log",
    benchmark:
        "benchmarks/{suite}/hub_data.tsv"
    shell:
        "python -m epmq suite data --suite-config {params.suite_config:q} --out {output:q} > {log:q} 2>&1"


rule hub_pretrained:
    wildcard_constraints:
        suite=one_of(HUB_SUITES),
    input:
        suite_config=suite_config_files,
    resources:
        hub_fetch=1,
    output:
        directory("results/{suite}/pretrained"),
    params:
        suite_config=lambda w: suite_config_path(w.suite),
    conda:
        "../environment.yml"
    log:
        "logs/{suite}/hub_pretrained.log",
    benchmark:
        "benchmarks/{suite}/hub_pretrained.tsv"
    shell:
        "python -m epmq suite pretrain --suite-config {params.suite_config:q} --out {output:q} > {log:q} 2>&1"


rule hub_expert:
    wildcard_constraints:
        suite=one_of(HUB_SUITES),
    resources:
        hub_fetch=1,
    input:
        suite_config=suite_config_files,
        pretrained="results/{suite}/pretrained",
    output:
        directory("results/{suite}/experts/{task}"),
    params:
        suite_config=lambda w: suite_config_path(w.suite),
    conda:
        "../environment.yml"
    log:
        "logs/{suite}/hub_expert/{task}.log",
    benchmark:
        "benchmarks/{suite}/hub_expert/{task}.tsv"
    shell:
        "python -m epmq suite finetune --suite-config {params.suite_config:q} --pretrained {input.pretrained:q}"
        " --task {wildcards.task:q} --out {output:q} > {log:q} 2>&1"
