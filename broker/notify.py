"""Doorbells and completions over ZeroMQ, sent only to a peer that said it sleeps.

Each side spins on the shared slot for an adaptive while before it sleeps
(DESIGN.md: virtio's notification suppression applied to the sharing page). The
"I sleep" flag and the slot state are plain stores with no fence between them, so a
wake-up can in rare interleavings be missed; every sleep therefore has a short
timeout after which the sleeper looks at the shared memory again.
"""

from __future__ import annotations

import time
from pathlib import Path

import zmq

SLEEP_RECHECK_MS = 2


def door_endpoint(run_dir: Path, backend: str) -> str:
    return f"ipc://{run_dir}/{backend}.door"


def done_endpoint(run_dir: Path, cpu: int) -> str:
    return f"ipc://{run_dir}/vcpu{cpu}.done"


def irq_endpoint(run_dir: Path) -> str:
    return f"ipc://{run_dir}/vcpu.irq"


def vcpu_control_endpoint(run_dir: Path) -> str:
    return f"ipc://{run_dir}/vcpu.ctl"


def broker_endpoint(run_dir: Path) -> str:
    return f"ipc://{run_dir}/broker.events"


def monitor_endpoint(run_dir: Path) -> str:
    return f"ipc://{run_dir}/monitor"


def push_socket(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    """A PUSH that never blocks the sender and is dropped at close (hints, not data)."""
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 64)
    s.setsockopt(zmq.IMMEDIATE, 1)
    s.connect(endpoint)
    return s


def pull_socket(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    s = ctx.socket(zmq.PULL)
    s.setsockopt(zmq.LINGER, 0)
    s.bind(endpoint)
    return s


def ring(sock: zmq.Socket, msg: bytes) -> None:
    try:
        sock.send(msg, zmq.NOBLOCK)
    except zmq.Again:
        pass  # the peer's queue is full of wake-ups already, or it is not there yet


def drain(sock: zmq.Socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(zmq.NOBLOCK))
        except zmq.Again:
            return out


class AdaptiveSpin:
    """How long to spin before sleeping, learned from recent waits.

    A hit (the peer answered while we spun) keeps the budget; misses shrink it so an
    idle peer costs no core (these machines have two); it grows back on hits.
    """

    def __init__(self, max_ns: int = 100_000, min_ns: int = 2_000) -> None:
        self.max_ns = max_ns
        self.min_ns = min_ns
        self.budget_ns = max_ns

    def spin(self, done: callable) -> bool:
        if done():
            return True
        clock = time.monotonic_ns
        deadline = clock() + self.budget_ns
        while clock() < deadline:
            if done():
                self.budget_ns = min(self.max_ns, self.budget_ns * 2)
                return True
        self.budget_ns = max(self.min_ns, self.budget_ns // 2)
        return False
