"""The fork server: one process per machine imports torch once; each workflow job runs in a fork of it.

A training job spends about 4 s starting Python and importing torch (with torchvision, numpy and
pandas) before it trains; a study runs dozens of such jobs. With ``fork_server: true`` (the
default), the first job of a study starts a *fork server* that imports those modules once and
listens on a Unix socket; every job then connects, hands over its command line, working folder,
environment and standard streams, and the fork server forks a child that runs the script as
``__main__``. The job waits for the child and exits with its exit code, so Snakemake, logs,
``| tee`` and exit codes see what they would see without it.

- A job that dies (Snakemake cancels it, or it is killed) closes its connection; the fork server
  then kills the child's whole process group at once.
- The fork server's key names the Python executable, ``$PYTHONPATH`` (what the interpreter loads
  at start-up) and the code (size and modification time of every file of the package and
  scripts), so edited code gets a fresh fork server; it exits
  after ``IDLE_S`` seconds without a running child.
- Nothing runs in the fork server unless ``$TLSELECT_FORK_SERVER`` is ``1`` (the Snakefile sets it
  from the config), and never inside a SLURM job, where every job has a node of its own. A fork server
  that cannot start or answer leaves the job to run in its own process, as without it.
- The fork server never starts CUDA, so each child claims its GPU (``tlselect.training.gpus``)
  before CUDA starts, as a fresh process would.
- Snakemake's ``benchmark:`` files keep the job's wall time; their memory and CPU columns measure
  the waiting job, not the child.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

ENV = "TLSELECT_FORK_SERVER"
DIR_ENV = "TLSELECT_FORK_SERVER_DIR"
IDLE_S = float(os.environ.get("TLSELECT_FORK_SERVER_IDLE_S", "120"))
START_TIMEOUT_S = 120.0
REPO = Path(__file__).resolve().parents[2]
PRELOAD = (
    "torch",
    "torch._dynamo",  # the first optimizer imports it anyway
    "torchvision.models",
    "numpy",
    "pandas",
    "matplotlib.pyplot",
    "tlselect.training.trainer",
    "tlselect.training.features",
    "tlselect.core.registry",
    "tlselect.search.brackets",
    "tlselect.search.compare",
    "tlselect.search.proxies",
    "tlselect.report.tables",
    "tlselect.report.plots",
)
serving = False  # true in the fork server and its children: a job runs here, it is not handed on


def enabled() -> bool:
    return os.environ.get(ENV) == "1" and "SLURM_JOB_ID" not in os.environ and not serving


def key() -> str:
    """Which fork server serves this interpreter, its start-up path and this code."""
    digest = hashlib.sha256(f"{sys.executable}\0{sys.prefix}\0{os.environ.get('PYTHONPATH', '')}\0{REPO}".encode())
    for folder in (REPO / "tlselect", REPO / "scripts"):
        for path in sorted(folder.rglob("*.py")):  # subpackages too
            stat = path.stat()
            digest.update(f"{path.relative_to(REPO)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]


def folder() -> Path:
    path = Path(
        os.environ.get(DIR_ENV) or Path(os.environ.get("TMPDIR", "/tmp")) / f"tlselect-forkserver-{os.getuid()}"
    )
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to another user; set ${DIR_ENV} to a folder of your own")
    return path


# -- the job's side ---------------------------------------------------------------------------


def run_in_fork_server(script: str) -> None:
    """Hand ``script`` (this process's ``__main__``) to the fork server and exit with its code.

    Returns (the caller then runs the script itself) when the fork server is off or unavailable.
    """
    if not enabled():
        return
    try:
        connection = _connect(folder() / key())
    except (OSError, TimeoutError) as error:
        print(f"the fork server unavailable ({error}); running in this process", file=sys.stderr)
        return
    request = {"script": str(Path(script).resolve()), "argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ)}
    with connection:
        payload = json.dumps(request).encode()
        socket.send_fds(connection, [struct.pack("!I", len(payload))], [0, 1, 2])
        connection.sendall(payload)
        reply = _receive_exactly(connection, 4)
    if len(reply) < 4:  # the fork server died under the job
        print("error: the fork server ended before the job; run the same command again", file=sys.stderr)
        os._exit(1)
    code = struct.unpack("!i", reply)[0]
    if code < 0:  # the child was killed by a signal: end the same way
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def _connect(base: Path) -> socket.socket:
    """A connection to the fork server for ``base``; start it first if none is running."""
    with contextlib.suppress(OSError):
        return _open(base)
    started = time.monotonic()
    with open(f"{base}.start", "w") as lock:  # one job starts it; the others wait for it
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(OSError):
            return _open(base)
        with open(f"{base}.log", "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "tlselect.training.forkserver", str(base)],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        while time.monotonic() - started < START_TIMEOUT_S:
            if process.poll() is not None:
                raise OSError(f"the fork server exited with code {process.returncode}; see {base}.log")
            with contextlib.suppress(OSError):
                return _open(base)
            time.sleep(0.05)
    raise TimeoutError(f"the fork server did not answer within {START_TIMEOUT_S:.0f} s")


def _open(base: Path) -> socket.socket:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(f"{base}.sock")
    except OSError:
        connection.close()
        raise
    return connection


def _receive_exactly(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


# -- the fork server -------------------------------------------------------------------------


def serve(base: Path) -> None:
    """Import :data:`PRELOAD`, then fork a child per request until idle for :data:`IDLE_S`."""
    global serving
    serving = True
    lock = open(f"{base}.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # another fork server serves this key
    os.environ.setdefault("MPLBACKEND", "Agg")
    sys.path[:0] = [str(REPO / "scripts"), str(REPO)]
    for module in (*PRELOAD, "_cli"):
        __import__(module)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    Path(f"{base}.sock").unlink(missing_ok=True)
    listener.bind(f"{base}.sock")
    listener.listen(64)
    children: dict[int, socket.socket] = {}  # child pid -> its job's connection
    idle_since = time.monotonic()
    try:
        while children or time.monotonic() - idle_since < IDLE_S:
            readable, _, _ = select.select([listener, *children.values()], [], [], 0.2)
            for ready in readable:
                if ready is listener:
                    connection, _ = listener.accept()
                    pid = _start_child(connection, listener, children)
                    if pid:
                        children[pid] = connection
                else:  # a job's connection closed: the job died, so does its child
                    pid = next(p for p, c in children.items() if c is ready)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
            _reap(children)
            if children or readable:
                idle_since = time.monotonic()
    finally:
        Path(f"{base}.sock").unlink(missing_ok=True)
        listener.close()


def _start_child(connection: socket.socket, listener: socket.socket, children: dict) -> int | None:
    """Read a job's request and fork its child; the pid, or None for a broken request."""
    fds = []
    try:
        header, fds, _, _ = socket.recv_fds(connection, 4, 3)
        size = struct.unpack("!I", header)[0]
        payload = _receive_exactly(connection, size)
        if len(fds) != 3 or len(payload) != size:
            raise ConnectionError("the job closed its connection mid-request")
        request = json.loads(payload)
    except (OSError, ValueError, struct.error):
        connection.close()
        for fd in fds:
            os.close(fd)
        return None
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)  # its own group: killing the group ends the child and any process it starts
        listener.close()
        for other in children.values():
            other.close()
        connection.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os._exit(_run_child(request))
    with contextlib.suppress(OSError):  # also here, so that a kill right after the fork reaches it
        os.setpgid(pid, pid)
    for fd in fds:
        os.close(fd)
    return pid


def _run_child(request: dict) -> int:
    """Run the job's script as ``__main__`` with its argv, folder and environment; its exit code."""
    import runpy

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = request["argv"]
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    code = 0
    try:
        runpy.run_path(request["script"], run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if not isinstance(exit_.code, int | None):
            print(exit_.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def _reap(children: dict[int, socket.socket]) -> None:
    """Tell each finished child's job its exit code (negative: the signal that ended it)."""
    for pid in list(children):
        done, status = os.waitpid(pid, os.WNOHANG)
        if not done:
            continue
        connection = children.pop(pid)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        with contextlib.suppress(OSError):
            connection.sendall(struct.pack("!i", code))
        connection.close()


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
