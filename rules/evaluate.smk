# Evaluate one model on its suite's tasks (an expert on its own task): one {task}.json per task,
# all tasks in one job, since start-up costs as much as a task of the offline suites. The experts
# are inputs because some suites keep per-task heads in them (mini-text4). With
# `evaluate_in_producer` the jobs that fine-tune, merge and quantize evaluate their models instead
# (ruleorder).


ruleorder: suite_finetune > evaluate
ruleorder: merge > evaluate
ruleorder: quantize > evaluate


rule evaluate:
    input:
        unpack(evaluation_inputs),
        model="results/{suite}/{model}",
    output:
        directory("results/{suite}/eval/{model}"),
    params:
        suite_config=lambda w: suite_config_path(w.suite),
        tasks=evaluation_tasks,
    threads: config["threads"]
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=1,
    conda:
        "../environment.yml"
    log:
        "logs/{suite}/evaluate/{model}.log",
    benchmark:
        "benchmarks/{suite}/evaluate/{model}.tsv"
    shell:
        "python -m epmq evaluate --suite-config {params.suite_config:q} --suite-dir results/{wildcards.suite:q}"
        " --model {input.model:q} --data {input.data:q} --threads {threads} --tasks {params.tasks:q}"
        " --out-dir {output:q} > {log:q} 2>&1"
