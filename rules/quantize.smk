# Quantize a merged model: rtn, gptq, awq, epmq-a{alpha} or epmq_fp-a{alpha} (the sequential continuous relaxation: unrounded W* targets),
# and evaluate it in the same job (`evaluate_in_producer`, rules/common.smk).


rule quantize:
    input:
        unpack(evaluated_here_inputs),
        model="results/{suite}/merged/{merge}",
        experts=quantize_experts,
        calib=calibration_inputs,
    output:
        model=directory("results/{suite}/quant/{merge}/{method}/w{bits}g{group}n{samples}"),
        **evaluated_here("quant/{merge}/{method}/w{bits}g{group}n{samples}"),
    params:
        flags=quantize_flags,
        calib=lambda w, input: calibration_files(input.calib, w.suite),
        tasks=lambda w, input: tasks(w.suite) if input.calib else [],
        then_evaluate=then_evaluate,
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
        " --experts {input.experts:q} --calib {params.calib:q} --tasks {params.tasks:q} --out {output.model:q} {params.then_evaluate} > {log:q} 2>&1"
