# Report: registry -> tables -> figures -> executed notebook (papermill) and its HTML.


rule aggregate:
    input:
        records=expand(
            "results/registry/{run_id}.json", run_id=sorted([*RUNS, *PROBES])
        ),
        source=(
            [f"results/source/{config['backbone']}.json"]
            if uses_source(config)
            else []
        ),
    output:
        runs=report("results/tables/runs.csv", category="Tables"),
        curves="results/tables/curves.csv",
        summary=report("results/tables/summary.md", category="Tables"),
    log:
        "results/logs/aggregate.log",
    conda:
        "../envs/torch.yaml"
    params:
        script=script("evaluate.py"),
        source=lambda wildcards, input: (
            f"--source-record {input.source}" if input.source else ""
        ),
    shell:
        "python {params.script} {input.records} {params.source} "
        "--out-dir results/tables 2>&1 | tee {log}"


rule figure:
    input:
        runs="results/tables/runs.csv",
        curves="results/tables/curves.csv",
    output:
        report("results/figures/{figure}.png", category="Figures"),
    log:
        "results/logs/figures/{figure}.log",
    wildcard_constraints:
        figure="|".join(FIGURES),
    conda:
        "../envs/torch.yaml"
    params:
        script=script("plot.py"),
    shell:
        "python {params.script} {wildcards.figure} --runs {input.runs} "
        "--curves {input.curves} --out {output} 2>&1 | tee {log}"


rule notebook:
    input:
        notebook=f"{workflow.basedir}/notebooks/solution.ipynb",
        runs="results/tables/runs.csv",
        curves="results/tables/curves.csv",
        figures=expand("results/figures/{figure}.png", figure=FIGURES),
    output:
        notebook="results/report/solution.ipynb",
        html=report("results/report/solution.html", category="Notebook"),
    log:
        "results/logs/notebook.log",
    conda:
        "../envs/torch.yaml"
    shell:
        "(papermill {input.notebook} {output.notebook} --cwd . "
        "-p runs_csv {input.runs} -p curves_csv {input.curves} -p figures_dir results/figures "
        "&& jupyter nbconvert --to html {output.notebook} --output-dir results/report) "
        "> {log} 2>&1"
