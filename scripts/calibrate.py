#!/usr/bin/env python
"""Measure this device's execution plan again, on purpose (the workflow's ``plan_recalibrate`` target).

Takes scripts/train.py's flags (the study's plan flags, backbone, resolution, batch size, --data,
--plans, device, threads; --gpus and --gpu-jobs-per-device as there). Measures the knobs the flags
leave to the plan (--auto) and every knob the per-user plan cache holds for this device, from the
defaults, and replaces the cached plan (``$TLSELECT_PLAN_CACHE``, else
``${XDG_CACHE_HOME:-~/.cache}/tlselect/plans``) unless the calibration is refused under load. A
study that already has its copy under --plans keeps it (a plan never changes under a study); a
fresh folder gets the new one. Exit code 1 when the calibration was refused.
"""

import sys

from _cli import cli

from tlselect.training.options import job_config
from tlselect.training.trainer import recalibrate_plan


@cli
def main(argv=None) -> int:
    config = job_config(argv, __doc__)
    note = recalibrate_plan(config)
    outcome = note["recalibration"]
    plan = ", ".join(f"{k}={v}" for k, v in outcome["plan"].items())
    if outcome["refused"]:
        print(f"plan: recalibration refused ({outcome['refused']}); measure again when the machine is quiet")
        return 1
    where = outcome["cache_file"] if outcome["cache_written"] else "nowhere (the cache could not be written)"
    print(f"plan: measured in {outcome['seconds']:.1f}s: {plan}; stored in {where}")
    if note["source"] == "recalibrated" and note["file"]:
        print(f"plan: this study's copy is {note['file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
