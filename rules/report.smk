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
    threads: 1
    resources:
        mem_mb=lambda wildcards, attempt: 1000 * attempt,
        runtime=10,
    params:
        script=script("evaluate.py"),
        source=lambda wildcards, input: (
            f"--source-record {input.source}" if input.source else ""
        ),
    shell:
        "python {params.script} {input.records} {params.source} "
        "--out-dir results/tables 2>&1 | tee {log}"


rule optimizations_table:
    input:
        "results/benchmarks/optimizations.json",
    output:
        report("results/tables/optimizations.csv", category="Tables"),
    log:
        "results/logs/optimizations_table.log",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=lambda wildcards, attempt: 1000 * attempt,
        runtime=10,
    params:
        script=script("evaluate.py"),
    shell:
        "python {params.script} --optimizations {input} --out-dir results/tables 2>&1 | tee {log}"


rule figure:
    input:
        unpack(figure_inputs),
    output:
        report("results/figures/{figure}.png", category="Figures"),
    log:
        "results/logs/figures/{figure}.log",
    wildcard_constraints:
        figure="|".join(FIGURES),
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=lambda wildcards, attempt: 1000 * attempt,
        runtime=10,
    params:
        script=script("plot.py"),
        optimizations=lambda wildcards, input: (
            f"--optimizations {input.optimizations}"
            if "optimizations" in input.keys()
            else ""
        ),
    shell:
        "python {params.script} {wildcards.figure} --runs {input.runs} "
        "--curves {input.curves} {params.optimizations} --out {output} 2>&1 | tee {log}"


rule notebook:
    input:
        notebook=f"{workflow.basedir}/notebooks/solution.ipynb",
        runs="results/tables/runs.csv",
        curves="results/tables/curves.csv",
        figures=expand("results/figures/{figure}.png", figure=FIGURES),
        optimizations=["results/tables/optimizations.csv"] if BENCHMARKS else [],
        search=SEARCH_TABLES[:1],
        proxies=SEARCH_TABLES[1:2],
        proxy_tau=SEARCH_TABLES[2:],
        search_figures=SEARCH_OUTPUTS[3:],
    output:
        notebook="results/report/solution.ipynb",
        html=report("results/report/solution.html", category="Notebook"),
    log:
        "results/logs/notebook.log",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=30,
    # papermill saves its output after every cell: execute and convert in a temporary folder, then
    # rename both into place, so no reader ever sees a half-executed notebook.
    shell:
        "(tmp=$(mktemp -d results/report/.notebook.XXXXXX) && trap 'rm -rf $tmp' EXIT "
        "&& papermill {input.notebook} $tmp/solution.ipynb --cwd . "
        "-p runs_csv {input.runs} -p curves_csv {input.curves} -p figures_dir results/figures "
        "-p optimizations_csv '{input.optimizations}' "
        "-p search_csv '{input.search}' -p proxies_csv '{input.proxies}' "
        "-p proxy_tau_csv '{input.proxy_tau}' "
        "&& jupyter nbconvert --to html $tmp/solution.ipynb --output-dir $tmp "
        "&& mv $tmp/solution.html {output.html} && mv $tmp/solution.ipynb {output.notebook}) "
        "> {log} 2>&1"
