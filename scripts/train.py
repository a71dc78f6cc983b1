#!/usr/bin/env python
"""Train one run on decoded subset tensors (a probe: on one cached layer); write its checkpoint and record.

Every field of ``tlselect.training.options.TrainConfig`` is a flag; see ``--help``. Two more: --gpus N, the
GPUs the scheduler gave this job (a rule passes its gpu resource); they are claimed before CUDA
starts, N=0 hides every GPU (tlselect.training.gpus). Without it the run sees the GPUs its environment shows.
--gpu-jobs-per-device M: at most M jobs share one GPU (default 1).
"""

import sys

from _cli import cli

from tlselect.core.registry import write_record
from tlselect.training.options import job_config
from tlselect.training.trainer import train


@cli
def main(argv=None) -> int:
    config = job_config(argv, __doc__)
    record = train(config)
    if config.record:
        write_record(config.record, record)
    return 0  # a diverged run is a result too: its record says so


if __name__ == "__main__":
    sys.exit(main())
