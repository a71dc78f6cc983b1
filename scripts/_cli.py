"""Start-up of every rule script: make the package importable and hand the job to the fork server.

Every script imports this module before anything heavy. When a script runs as a workflow job with
the fork server on (``tlselect.training.forkserver``), importing it hands the whole script to the
fork server, which already has torch imported, and the job ends with the script's exit code there.
Every script's ``main`` is wrapped by :func:`tlselect.core.errors.cli` (imported from here), which
turns a user-fixable error into ``error: <message>`` and exit code 2.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tlselect.core.errors import cli  # noqa: E402, F401 (the scripts import it from here)
from tlselect.training import forkserver  # noqa: E402

_main_file = getattr(sys.modules.get("__main__"), "__file__", None)
if _main_file and Path(_main_file).resolve().parent == REPO / "scripts":
    forkserver.run_in_fork_server(_main_file)  # returns when the script is to run in this process
