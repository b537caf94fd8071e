"""`mongobranch serve --workers N`: N serve processes of one machine sharing its ports.

This process only supervises: it starts N copies of its own command line, each told its
index and a group name (environment variables), restarts one that exits (a holder that
lost its lease exits 3 on purpose), passes SIGTERM and SIGINT on, and exits once they
all have. Each worker listens on the same main, branch and admin port numbers
(SO_REUSEPORT), so the kernel spreads connections across them; one holds the engine
lease and serves the branches (docs/ARCHITECTURE.md, "Workers").
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType

log = logging.getLogger("mongobranch.workers")

INDEX_ENV = "MONGOBRANCH_WORKER"
GROUP_ENV = "MONGOBRANCH_WORKER_GROUP"
# Each worker's own admin socket (a descriptor it inherits), and every worker's port of
# it in index order: where the others forward to the engine's holder and gather
# /metrics from.
ADMIN_FD_ENV = "MONGOBRANCH_WORKER_ADMIN_FD"
ADMIN_PORTS_ENV = "MONGOBRANCH_WORKER_ADMIN_PORTS"
RESTART_DELAY = 1.0
# A worker that exits this way was started with a configuration it refuses: starting
# it again would fail the same way.
CONFIG_ERROR = 2
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Worker:
    index: int
    group: str
    # This worker's private admin socket, listening, bound by the supervisor.
    admin_fd: int
    # Every worker's private admin port, by index.
    admin_ports: tuple[int, ...]


def this_worker() -> Worker | None:
    """Set when this process is one of a supervisor's workers (which sets every one of
    these variables)."""
    index = os.environ.get(INDEX_ENV)
    if index is None:
        return None
    return Worker(int(index), os.environ[GROUP_ENV], int(os.environ[ADMIN_FD_ENV]),
                  tuple(int(p) for p in os.environ[ADMIN_PORTS_ENV].split(",")))


def _die_with_parent() -> None:
    """In the worker before it runs: SIGTERM when the supervisor dies, even by SIGKILL,
    so that no worker outlives it holding the ports (Linux's PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the worker outlives a killed supervisor
        pass


def supervise(workers: int, argv: list[str]) -> int:
    group = secrets.token_hex(4)
    procs: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False
    # Bound here, so that a worker started again gets the same port back.
    admin = []
    for _ in range(workers):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        admin.append(sock)
    ports = ",".join(str(sock.getsockname()[1]) for sock in admin)

    def start(index: int) -> None:
        fd = admin[index].fileno()
        env = {**os.environ, INDEX_ENV: str(index), GROUP_ENV: group,
               ADMIN_FD_ENV: str(fd), ADMIN_PORTS_ENV: ports}
        procs[index] = subprocess.Popen([sys.executable, "-m", "proxy.cli", *argv], env=env,
                                        pass_fds=(fd,), preexec_fn=_die_with_parent)
        log.info("worker %d started (pid %d)", index, procs[index].pid)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for index in range(workers):
        start(index)
    code = 0
    while procs:
        pid, status = os.wait()
        gone = next((i for i, p in procs.items() if p.pid == pid), None)
        if gone is None:
            continue
        exited = os.waitstatus_to_exitcode(status)
        del procs[gone]
        if stopping:
            continue
        if exited == CONFIG_ERROR:
            log.error("worker %d refused its configuration (exit %d); stopping the others",
                      gone, exited)
            code = CONFIG_ERROR
            on_signal(signal.SIGTERM, None)
            continue
        log.warning("worker %d exited (%d); starting it again", gone, exited)
        time.sleep(RESTART_DELAY)
        if not stopping:
            start(gone)
    return code
