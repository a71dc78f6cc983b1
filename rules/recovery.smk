# What this run does with what an earlier one left (tlselect.core.recovery, docs/failure-and-recovery.md).
# Included after the other rule files (it looks their rules up), before the DAG is built.
import shutil
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger

from tlselect.core import recovery


def made_by_a_rule(path):
    """Whether some rule of this configuration makes ``path``. One of its output patterns matches the
    path within the wildcard constraints, and its input functions accept the wildcards (they raise for
    a run the configuration does not have, where a constraint is looser, as the search's ``[^/]+``).
    """
    for producer in workflow.rules:
        if producer.is_producer(path):
            try:
                producer.expand_input(producer.get_wildcards(path))
            except WorkflowError:
                continue
            return True
    return False


def corrupt_files(wildcards):
    """Files a job found corrupt (tlselect.core.files.verify moved each to <file>.corrupt), so that this
    run computes them anew, and everything that reads them. The marker of a file no rule makes any
    more is moved aside to results/.set-aside/ instead (tlselect.core.recovery)."""
    return recovery.corrupt_targets(
        recovery.corrupt_markers(),
        made_by_a_rule,
        dry_run=workflow.dryrun,
        log=logger.warning,
    )


# The SLURM jobs a dead run of this folder left pending or running (asked of squeue where the folder
# has the SLURM executor's logs, .snakemake/slurm_logs): wait for them; then keep the outputs that
# interrupted jobs wrote whole, instead of running those jobs again (tlselect.core.recovery). Not
# inside a job, nor while a Snakemake (live, or dead and not yet unlocked: `snakemake --unlock`
# parses this file too) holds the folder's lock.
if workflow.is_main_process and not any(Path(".snakemake/locks").glob("*")):
    if shutil.which("squeue") and Path(".snakemake/slurm_logs").is_dir():
        recovery.wait_for_slurm_jobs(
            workflow.workdir_init,
            [each.name for each in workflow.rules],
            log=logger.info,
        )
    recovery.keep_complete_outputs(log=logger.info)
