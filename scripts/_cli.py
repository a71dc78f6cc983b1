"""Shared start-up for the command-line entry points: make the package importable, start warm, report errors.

Every script imports this module before anything heavy. When a script runs as a workflow job with
warm start on (``tlselect.warm``), importing it hands the whole script to the warm process, which
already has torch imported, and the job ends with the script's exit code there.

Every script's ``main`` is wrapped by :func:`cli`, which turns a
:class:`tlselect.errors.TLSelectError` into ``error: <message>`` on stderr and exit code 2, the
same way for every script.
"""

import functools
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tlselect import warm  # noqa: E402
from tlselect.errors import TLSelectError  # noqa: E402

_main_file = getattr(sys.modules.get("__main__"), "__file__", None)
if _main_file and Path(_main_file).resolve().parent == REPO / "scripts":
    warm.run_script_warm(_main_file)  # returns when the script is to run in this process


def cli(main: Callable[..., int | None]) -> Callable[..., int]:
    """``main(argv)`` returning its exit code; a user-fixable error prints its message and returns 2."""

    @functools.wraps(main)
    def wrapped(argv=None) -> int:
        try:
            return main(argv) or 0
        except TLSelectError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    return wrapped
