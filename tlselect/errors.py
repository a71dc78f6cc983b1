"""The project's one error base class: a problem the user can fix, with a message that names it.

Every module raises a subclass (bad config, data, weights, GPUs, registry records, trainer
settings); the command-line entry points turn any of them into ``error: <message>`` on stderr and
exit code 2 (:func:`scripts._cli.main`), instead of a traceback.
"""


class TLSelectError(Exception):
    """A problem with the user's input or setup; the message names it and the fix."""
