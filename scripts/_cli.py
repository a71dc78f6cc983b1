"""Shared start-up for the command-line entry points: make the package importable, report errors.

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

from tlselect.errors import TLSelectError  # noqa: E402


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
