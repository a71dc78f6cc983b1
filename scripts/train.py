#!/usr/bin/env python
"""Train one model (one policy) on decoded subset tensors; write its checkpoint and registry record.

Every field of ``tlselect.train.TrainConfig`` is a flag; see ``--help``.
"""

import sys

import _cli  # noqa: F401  (makes the tlselect package importable)

from tlselect.data import DataError
from tlselect.models import InitError
from tlselect.registry import write_record
from tlselect.train import TrainingError, config_from_args, train


def main(argv=None) -> int:
    config = config_from_args(argv, __doc__)
    try:
        record = train(config)
    except (DataError, InitError, TrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if config.record:
        write_record(config.record, record)
    return 0  # a diverged run is a result too: its record says so


if __name__ == "__main__":
    sys.exit(main())
