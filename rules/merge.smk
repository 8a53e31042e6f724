# Merge the experts of a suite with one operator (simple_average, task_arithmetic, ties, wudi).


rule merge:
    input:
        pretrained="results/{suite}/pretrained",
        experts=expert_dirs,
    output:
        directory("results/{suite}/merged/{merge}"),
    params:
        extra=merge_param_flags,
    threads: config["threads"]
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../environment.yml"
    log:
        "logs/{suite}/merge/{merge}.log",
    benchmark:
        "benchmarks/{suite}/merge/{merge}.tsv"
    shell:
        "OMP_NUM_THREADS={threads} python -m epmq merge --method {wildcards.merge:q} --pretrained {input.pretrained:q}"
        " --experts {input.experts:q} {params.extra} --out {output:q} > {log:q} 2>&1"
