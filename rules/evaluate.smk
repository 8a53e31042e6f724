# Evaluate one model on its suite's tasks (an expert on its own task): one {task}.json per task,
# all tasks in one job, since start-up costs as much as a task of the offline suites. The experts
# are inputs because some suites keep per-task heads in them (mini-text4).


rule evaluate:
    input:
        suite_config=suite_config_files,
        model="results/{suite}/{model}",
        data="results/{suite}/data",
        pretrained="results/{suite}/pretrained",
        experts=expert_dirs,
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
