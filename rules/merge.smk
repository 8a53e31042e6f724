# Merge the experts of a suite with one operator (simple_average, task_arithmetic, ties, wudi), and
# evaluate the merged model in the same job (`evaluate_in_producer`, rules/common.smk).


rule merge:
    input:
        unpack(evaluated_here_inputs),
        pretrained="results/{suite}/pretrained",
        experts=expert_dirs,
    output:
        model=directory("results/{suite}/merged/{merge}"),
        **evaluated_here("merged/{merge}"),
    params:
        extra=merge_param_flags,
        then_evaluate=then_evaluate,
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
        " --experts {input.experts:q} {params.extra} --out {output.model:q} {params.then_evaluate} > {log:q} 2>&1"
