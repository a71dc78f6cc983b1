#!/usr/bin/env python
"""Remove the resume files of runs that are no longer in the config.

A killed training job leaves ``<checkpoint stem>.resume.pt`` beside its checkpoint so that the
same job resumes. When the config changes (another learning rate, a policy removed), the old run
is never run again and its resume file stays. Rule ``remove_stale_resume_files`` passes every
checkpoint the current config's jobs write (--keep); every other ``*.resume.pt`` under --results
is listed and removed, with its checksum file. Nothing else is deleted; --dry-run only lists.
"""

import argparse
import sys
from pathlib import Path

from _cli import cli

from tlselect.core.files import remove, stale_resume_files


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, help="the results folder to search")
    parser.add_argument("--keep", nargs="*", default=[], help="checkpoints of the current config's runs")
    parser.add_argument("--dry-run", action="store_true", help="list the stale resume files, remove nothing")
    args = parser.parse_args(argv)
    stale = stale_resume_files(Path(args.results), args.keep)
    for path in stale:
        print(f"{'stale' if args.dry_run else 'removing'} {path} ({path.stat().st_size / 2**20:.1f} MB)")
        if not args.dry_run:
            remove(path)  # and its checksum
    print(f"{len(stale)} stale resume file(s){' found' if args.dry_run else ' removed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
