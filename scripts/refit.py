#!/usr/bin/env python
"""Retrain the selected policy or probe on every fold (the refit of k-fold validation): choose it
from the folds' registry records (``tlselect.runs.refit_flags``) and train it with one seed.

--records: every policy's and probe's record; --seed: the refit's seed. Every other flag is
``scripts/train.py``'s (--out, --record, --run-id, the plan's and the GPUs' flags) and wins over
the selected run's settings.
"""

import argparse
import sys

from _cli import cli

from tlselect.core.registry import read_record, write_record
from tlselect.runs import refit_flags
from tlselect.training.options import job_config
from tlselect.training.trainer import train


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, add_help=False, allow_abbrev=False)
    parser.add_argument("--records", nargs="+", required=True, help="registry records of the folds' runs")
    parser.add_argument("--seed", type=int, required=True, help="seed of the refit")
    args, rest = parser.parse_known_args(argv)
    config = job_config(refit_flags([read_record(path) for path in args.records], args.seed) + rest, __doc__)
    write_record(config.record, train(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
