"""The project's one error base class: a problem the user can fix, with a message that names it.

Every module raises a subclass (bad config, data, weights, GPUs, registry records, trainer
settings); the command-line entry points turn any of them into ``error: <message>`` on stderr and
exit code 2 (:func:`cli`), instead of a traceback.
"""

import functools
import sys
from collections.abc import Callable


class TLSelectError(Exception):
    """A problem with the user's input or setup; the message names it and the fix."""


def cli(main: Callable[..., int | None]) -> Callable[..., int]:
    """``main(argv)`` returning its exit code; a user-fixable error prints ``error: <message>`` and
    returns 2, the same way for every command-line entry point."""

    @functools.wraps(main)
    def wrapped(argv=None) -> int:
        try:
            return main(argv) or 0
        except TLSelectError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    return wrapped
