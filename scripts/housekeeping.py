#!/usr/bin/env python
"""Remove the resume files of runs that are no longer in the config, or the kept files of run groups
that no output shares any more.

A killed training job leaves ``<checkpoint stem>.resume.pt`` beside its checkpoint so that the
same job resumes. When the config changes (another learning rate, a policy removed), the old run
is never run again and its resume file stays. Rule ``remove_stale_resume_files`` passes every
checkpoint the current config's jobs write (--keep); every other ``*.resume.pt`` under --results
is listed and removed, with its checksum file.

A run group's job hard-links each finished run's files into ``results/cache/runs`` (so that a rerun
of the group restores them). Those links cost no space while the run's own files exist; once they
are removed or replaced, the kept copy is the only one. Rule ``remove_stale_kept_runs`` passes
--kept-runs: every file there with no other link is listed and removed. Run it when no study runs
(a group job restoring its runs at that moment would train them again).

Nothing else is deleted; --dry-run only lists.
"""

import argparse
import sys
from pathlib import Path

from _cli import cli

from tlselect.core.files import remove, stale_resume_files, unshared_files


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, help="the results folder to search")
    parser.add_argument("--keep", nargs="*", default=[], help="checkpoints of the current config's runs")
    parser.add_argument("--dry-run", action="store_true", help="list the stale resume files, remove nothing")
    parser.add_argument("--kept-runs", default="", help="a run groups' keep folder: remove its unshared files instead")
    args = parser.parse_args(argv)
    if args.kept_runs:
        stale, what, unlink = unshared_files(args.kept_runs), "kept run file", Path.unlink
    else:
        stale, what, unlink = (
            stale_resume_files(Path(args.results), args.keep),
            "resume file",
            remove,
        )  # and its checksum
    for path in stale:
        print(f"{'stale' if args.dry_run else 'removing'} {path} ({path.stat().st_size / 2**20:.1f} MB)")
        if not args.dry_run:
            unlink(path)
    print(f"{len(stale)} stale {what}(s){' found' if args.dry_run else ' removed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
