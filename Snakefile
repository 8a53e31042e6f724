# epmq: regenerate the tables and figures of E-PMQ (arXiv 2605.16882).
#   snakemake --profile profiles/local                  every target of config/config.yaml
#   snakemake --profile profiles/local table_1          one table
#   snakemake --profile profiles/slurm --configfile config/paper.yaml table_1
# Rules only wire files: each job is a `python -m epmq <stage>` call (see README).
from snakemake.utils import min_version, validate

min_version("9.0")


# config/config.yaml unless --configfile names another (files are not merged: each is complete).
if not config:

    configfile: "config/config.yaml"


validate(config, "rules/schemas/config.schema.yaml")


include: "rules/common.smk"
include: "rules/suites.smk"
include: "rules/experts.smk"
include: "rules/merge.smk"
include: "rules/quantize.smk"
include: "rules/evaluate.smk"
include: "rules/paper.smk"
include: "rules/diagnose.smk"


report: "report/workflow.rst"


rule all:
    input:
        [path for target in default_targets() for path in target_files(target)],
    default_target: True
