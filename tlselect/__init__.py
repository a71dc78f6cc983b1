"""Transfer-learning model selection: data, models, training, registry and report logic.

The Snakemake workflow (``Snakefile``, ``rules/``) calls the thin command-line entry points in
``scripts/``, which call this package; tests and the notebook import it directly.
"""
