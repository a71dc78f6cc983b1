#!/usr/bin/env python
"""Train one run on decoded subset tensors (a probe: on one cached layer), or a run group; write each
run's checkpoint and record.

Every field of ``tlselect.training.options.TrainConfig`` is a flag; see ``--help``. More: --gpus N, the
GPUs the scheduler gave this job (a rule passes its gpu resource); they are claimed before CUDA
starts, N=0 hides every GPU (tlselect.training.gpus). Without it the run sees the GPUs its environment shows.
--gpu-jobs-per-device M: at most M jobs share one GPU (default 1).
A run group (tlselect.training.groups): --run "FLAGS" once per run (its own flags), the other flags
shared by all; --fuse trains runs of one shape fused, --keep FOLDER keeps finished runs for a rerun.
"""

import sys

from _cli import cli

from tlselect.core.registry import write_record
from tlselect.training.groups import train_group
from tlselect.training.options import group_job
from tlselect.training.trainer import train


@cli
def main(argv=None) -> int:
    job = group_job(argv, __doc__)
    if len(job.runs) > 1:
        train_group(job.runs, fuse=job.fuse, keep=job.keep)
        return 0
    config = job.runs[0]
    record = train(config)
    if config.record:
        write_record(config.record, record)
    return 0  # a diverged run is a result too: its record says so


if __name__ == "__main__":
    sys.exit(main())
