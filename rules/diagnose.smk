# Diagnose a merge against its experts: per-layer merging and quantization deviations, and the
# checks that break quantizers (python -m epmq diagnose). Not a default target:
#   snakemake --profile profiles/local diagnose_offline     every offline suite's task-arithmetic merge
#   snakemake --profile profiles/local results/mini-clip8/diagnose/ties


rule diagnose:
    input:
        model="results/{suite}/merged/{merge}",
        experts=expert_dirs,
        calib=diagnose_calibration,
        quantized=diagnose_quantized,
    output:
        directory("results/{suite}/diagnose/{merge}"),
    params:
        calib=lambda w, input: calibration_files(input.calib, w.suite),
    threads: config["threads"]
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../environment.yml"
    log:
        "logs/{suite}/diagnose/{merge}.log",
    benchmark:
        "benchmarks/{suite}/diagnose/{merge}.tsv"
    shell:
        "OMP_NUM_THREADS={threads} python -m epmq diagnose --model {input.model:q} --experts {input.experts:q}"
        " --calib {params.calib:q} --quantized {input.quantized:q} --out {output:q} > {log:q} 2>&1"


rule diagnose_offline:
    input:
        expand("results/{suite}/diagnose/task_arithmetic", suite=OFFLINE_SUITES),
