# Report: registry -> tables -> figures -> executed notebook (papermill) and its HTML.


include: "inputs/report.smk"


rule tables:
    input:
        unpack(lambda wildcards: study_records()),
    output:
        runs=report(
            "results/tables/runs.csv", caption="../report/runs.rst", category=PICK
        ),
        curves="results/tables/curves.csv",
        summary=report(
            "results/tables/summary.md", caption="../report/summary.rst", category=PICK
        ),
        plans="results/tables/plans.csv",
    log:
        "results/logs/tables.log",
    priority: STUDY_FIRST
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        **SMALL_RESOURCES,
    params:
        script=script("tables.py"),
        source=lambda wildcards, input: (
            f"--source-record {input.source}" if "source" in input.keys() else ""
        ),
        refits=lambda wildcards, input: (
            f"--refits {' '.join(input.refits)}" if "refits" in input.keys() else ""
        ),
    shell:
        "python {params.script} {input.records} {params.source} {params.refits} --runs {output.runs} "
        "--curves {output.curves} --summary {output.summary} --plans {output.plans} 2>&1 | tee {log}"


rule optimizations_table:
    input:
        "results/speedups/optimizations.json",
    output:
        report(OPTIMIZATIONS, caption="../report/optimizations.rst", category=SPEED),
    log:
        "results/logs/optimizations_table.log",
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        **SMALL_RESOURCES,
    params:
        script=script("tables.py"),
    shell:
        "python {params.script} --optimizations {input} --optimizations-table {output} 2>&1 | tee {log}"


rule figure:
    input:
        unpack(figure_inputs),
    output:
        report(
            "results/figures/{figure}.png",
            caption="../report/figure.rst",
            category=lambda wildcards: FIGURE_QUESTIONS[wildcards.figure],
        ),
    log:
        "results/logs/figures/{figure}.log",
    wildcard_constraints:
        figure="|".join(FIGURES),
    priority: STUDY_FIRST
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        **SMALL_RESOURCES,
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
        unpack(notebook_inputs),
    output:
        notebook="results/report/{report}.ipynb",
        html=report(
            "results/report/{report}.html",
            caption="../report/notebook.rst",
            category=NOTEBOOK,
        ),
    log:
        "results/logs/notebook/{report}.log",
    wildcard_constraints:
        report="study|solution",
    priority: STUDY_FIRST
    conda:
        "../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=memory_mb(2000),
        runtime=30,
    params:
        repo=workflow.basedir,
        # cells left out of the HTML: papermill's parameters and the notebook's setup
        hidden=" ".join(
            f"--TagRemovePreprocessor.remove_cell_tags {tag}"
            for tag in ("parameters", "injected-parameters", "setup")
        ),
        figures_dir=lambda wildcards, input: os.path.dirname(input.figures[0]),
        tables=lambda wildcards, input: " ".join(
            f"-p {name}_csv '{input[name] if name in input.keys() else ''}'"
            for name in (
                "plans",
                "optimizations",
                "search",
                "proxies",
                "proxy_tau",
                "replay",
                "shift",
                "tenants",
                "replay_benchmark",
                "replay_benchmark_goals",
            )
        ),
    # The HTML shows no code (--no-input) and no parameter or setup cell: the .ipynb keeps them.
    # papermill saves its output after every cell: execute and convert in a temporary folder, then
    # rename both into place, so no reader ever sees a half-executed notebook. The folders a killed
    # job left behind go first.
    shell:
        "(rm -rf $(dirname {output.notebook})/.{wildcards.report}.notebook.* "
        "&& tmp=$(mktemp -d $(dirname {output.notebook})/.{wildcards.report}.notebook.XXXXXX) "
        "&& trap 'rm -rf $tmp' EXIT "
        "&& papermill {input.notebook} $tmp/{wildcards.report}.ipynb --cwd . "
        "-p repo {params.repo} -p runs_csv {input.runs} -p curves_csv {input.curves} -p figures_dir {params.figures_dir} "
        "{params.tables} "
        "&& jupyter nbconvert --to html --no-input --no-prompt {params.hidden} "
        "$tmp/{wildcards.report}.ipynb --output-dir $tmp "
        "&& mv $tmp/{wildcards.report}.html {output.html} "
        "&& mv $tmp/{wildcards.report}.ipynb {output.notebook}) > {log} 2>&1"
