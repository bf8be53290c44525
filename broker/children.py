"""Starting children so that none outlives splitvm, however splitvm ends."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent(parent: int) -> callable:
    def preexec() -> None:
        # SIGKILL when the supervisor dies, even by SIGKILL (it is single-threaded,
        # so "the thread that forked us" is the supervisor itself).
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)  # it died before prctl took effect
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    return preexec


def spawn(module: str, args: list[str], pass_fds: tuple[int, ...]) -> subprocess.Popen:
    """python -m MODULE ARGS, in splitvm's process group, killed if splitvm dies."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        pass_fds=pass_fds,
        preexec_fn=_die_with_parent(os.getpid()),
        env=env,
        stdin=subprocess.DEVNULL,
    )


def pidfd(pid: int) -> int:
    """A descriptor that becomes readable the moment the process dies (no polling)."""
    return os.pidfd_open(pid)
