# Quantize a merged model: rtn, gptq, awq, epmq-a{alpha} or epmq_fp-a{alpha} (the sequential continuous relaxation: unrounded W* targets).


rule quantize:
    input:
        model="results/{suite}/merged/{merge}",
        experts=quantize_experts,
        calib=calibration_files,
    output:
        directory("results/{suite}/quant/{merge}/{method}/w{bits}g{group}n{samples}"),
    params:
        flags=quantize_flags,
        tasks=lambda w, input: tasks(w.suite) if input.calib else [],
    threads: config["threads"]
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    conda:
        "../environment.yml"
    log:
        "logs/{suite}/quantize/{merge}/{method}/w{bits}g{group}n{samples}.log",
    benchmark:
        "benchmarks/{suite}/quantize/{merge}/{method}/w{bits}g{group}n{samples}.tsv"
    shell:
        "python -m epmq quantize --model {input.model:q} {params.flags} --threads {threads}"
        " --experts {input.experts:q} --calib {input.calib:q} --tasks {params.tasks:q} --out {output:q} > {log:q} 2>&1"
