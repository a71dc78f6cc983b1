#!/usr/bin/env python
"""Train one model (one policy) on decoded subset tensors; write its checkpoint and registry record.

Every field of ``tlselect.train.TrainConfig`` is a flag; see ``--help``. One more, --gpus N: the
GPUs the scheduler gave this job (a rule passes its gpu resource); they are claimed before CUDA
starts, N=0 hides every GPU (tlselect.gpus). Without it the run sees the GPUs its environment shows.
"""

import argparse
import sys

import _cli  # noqa: F401  (makes the tlselect package importable)

from tlselect.data import DataError
from tlselect.gpus import GPUError, assign
from tlselect.models import InitError
from tlselect.registry import write_record
from tlselect.train import TrainingError, config_from_args, train


def main(argv=None) -> int:
    gpus = argparse.ArgumentParser(add_help=False)
    gpus.add_argument("--gpus", type=int, default=None)
    known, rest = gpus.parse_known_args(argv)
    config = config_from_args(rest, __doc__)
    try:
        assign(known.gpus, config.device)
        record = train(config)
    except (DataError, GPUError, InitError, TrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if config.record:
        write_record(config.record, record)
    return 0  # a diverged run is a result too: its record says so


if __name__ == "__main__":
    sys.exit(main())
