# Aggregate the evaluations of each target into a tidy CSV, then render tables and figures.


rule aggregate:
    input:
        evals=target_eval_dirs,
        quant=target_quant_dirs,
    output:
        "results/tables/{target}.csv",
    conda:
        "../environment.yml"
    log:
        "logs/tables/{target}.aggregate.log",
    benchmark:
        "benchmarks/tables/{target}.aggregate.tsv"
    shell:
        "python -m epmq aggregate --eval-dirs {input.evals} --out {output} > {log} 2>&1"


rule render:
    input:
        "results/tables/{target}.csv",
    output:
        md="results/tables/{target}.md",
        tex="results/tables/{target}.tex",
        html=report("results/tables/{target}.html", category="Tables", labels={"target": "{target}"}),
    params:
        spec=lambda w: json.dumps(config["targets"][w.target]),
    conda:
        "../environment.yml"
    log:
        "logs/tables/{target}.render.log",
    benchmark:
        "benchmarks/tables/{target}.render.tsv"
    shell:
        "python -m epmq render --target {wildcards.target} --spec '{params.spec}' --metrics {input}"
        " --out-dir results/tables > {log} 2>&1"


rule plot:
    input:
        "results/tables/{target}.csv",
    output:
        report("results/tables/{target}.png", category="Figures", labels={"target": "{target}"}),
    params:
        spec=lambda w: json.dumps(config["targets"][w.target]),
    conda:
        "../environment.yml"
    log:
        "logs/tables/{target}.plot.log",
    benchmark:
        "benchmarks/tables/{target}.plot.tsv"
    shell:
        "python -m epmq render --target {wildcards.target} --spec '{params.spec}' --metrics {input}"
        " --out-dir results/tables --figure > {log} 2>&1"


for _target in config["targets"]:

    rule:
        name:
            _target
        input:
            target_files(_target),
        localrule: True


rule paper:
    input:
        [path for target in config["targets"] for path in target_files(target)],
    localrule: True
