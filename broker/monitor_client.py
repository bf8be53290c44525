"""`splitvm monitor TARGET [COMMAND...]`: the monitor of a running VM.

TARGET is its run directory, the monitor socket in it, or the splitvm pid.
With a command: run it, print the reply, exit. Without: one command per input line.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import zmq

REPLY_TIMEOUT_MS = 10_000


def running_vms() -> dict[int, Path]:
    """pid -> run directory, for live splitvm processes in the default places."""
    out = {}
    for base in {os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir(), tempfile.gettempdir()}:
        for d in Path(base).glob("splitvm-*"):
            try:
                pid = int((d / "pid").read_text())
                os.kill(pid, 0)
            except (OSError, ValueError):
                continue
            out[pid] = d
    return out


def resolve(target: str) -> Path:
    p = Path(target)
    if p.is_dir():
        p = p / "monitor"
    if p.exists():
        return p
    if target.isdigit() and int(target) in (vms := running_vms()):
        return vms[int(target)] / "monitor"
    raise FileNotFoundError(f"no splitvm monitor at {target!r} (give its run directory or pid)")


def ask(socket_path: Path, command: str, timeout_ms: int = REPLY_TIMEOUT_MS) -> str:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"ipc://{socket_path}")
    try:
        s.send(command.encode())
        if not s.poll(timeout_ms):
            raise TimeoutError(f"the monitor at {socket_path} did not answer")
        return s.recv().decode()
    finally:
        s.close()


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        vms = running_vms()
        if not argv and len(vms) == 1:
            argv = [str(*vms.values())]
        else:
            print("usage: splitvm monitor RUN_DIR|SOCKET|PID [COMMAND...]  (no target: the one running VM)",
                  file=sys.stderr)
            return 2
    if not Path(argv[0]).exists() and not argv[0].isdigit():
        vms = running_vms()
        if len(vms) == 1:
            argv = [str(*vms.values()), *argv]  # `splitvm monitor info backends`: the one running VM
    try:
        path = resolve(argv[0])
    except FileNotFoundError as e:
        print(f"splitvm: monitor: {e}", file=sys.stderr)
        return 2
    try:
        if len(argv) > 1:
            print(ask(path, " ".join(argv[1:])))
            return 0
        for line in sys.stdin:
            if line.strip():
                reply = ask(path, line)
                if reply:
                    print(reply, flush=True)
                if line.strip() in ("quit", "q"):
                    break
    except TimeoutError as e:
        print(f"splitvm: monitor: {e}", file=sys.stderr)
        return 1
    return 0
