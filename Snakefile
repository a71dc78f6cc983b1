# Transfer-learning model selection: which init, freeze depth and hyperparameters give the best
# accuracy for the compute spent. Stages live in rules/; configuration in config.yaml.


configfile: "config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/plan.smk"
include: "rules/source.smk"
include: "rules/features.smk"
include: "rules/join.smk"
include: "rules/speedups.smk"
include: "rules/search.smk"
include: "rules/groups.smk"
include: "rules/mop.smk"
include: "rules/tenants.smk"
include: "rules/report.smk"
# After every rule: what this run does with what an earlier one left (rule all's corrupt files).
include: "rules/recovery.smk"


rule all:
    default_target: True
    input:
        "results/tables/runs.csv",
        "results/tables/summary.md",
        expand("results/figures/{figure}.png", figure=FIGURES),
        expand("results/report/{report}.html", report=REPORTS),
        SEARCH_OUTPUTS.values(),
        BENCHMARK_OUTPUTS.values(),
        MOP_OUTPUTS,
        TENANT_OUTPUTS,
        corrupt_files,
