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

from tlselect.training.groups import train_runs
from tlselect.training.options import group_job


@cli
def main(argv=None) -> int:
    job = group_job(argv, __doc__)
    train_runs(job.runs, fuse=job.fuse, keep=job.keep)
    return 0  # a diverged run is a result too: its record says so


if __name__ == "__main__":
    sys.exit(main())
