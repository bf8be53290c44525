"""Doorbells and completions over ZeroMQ, sent only to a peer that said it sleeps.

Each side spins on the shared slot for an adaptive while before it sleeps
(DESIGN.md: virtio's notification suppression applied to the sharing page). The
"I sleep" flag and the slot state are plain stores with no fence between them, so a
wake-up can in rare interleavings be missed; every sleep therefore has a short
timeout after which the sleeper looks at the shared memory again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import zmq

SLEEP_RECHECK_MS = 2
DEFAULT_SPIN_MAX_NS = 150_000


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
    """A PUSH that never blocks the sender and is dropped at close (wake-ups, not data).

    Messages queue while the peer (re)connects, up to the high-water mark: the state
    they announce is in shared memory, so a dropped one costs only latency.
    """
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 64)
    # A peer that binds after we connect (a backend starting or restarting) is found
    # within 5 ms, not ZeroMQ's default 100 ms: until then every wake-up waits for a
    # sleep timeout.
    s.setsockopt(zmq.RECONNECT_IVL, 5)
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
    """How long to spin on shared memory before sleeping, learned from recent waits.

    Every wait is measured, including the ones that ended in a sleep and a wake-up:
    while the peer usually answers within max_ns, spinning for twice the recent
    wait catches it without the ~60 µs wake-up; when it does not (an idle console),
    the budget falls to zero and the side sleeps at once, costing no core (these
    machines have two).
    """

    def __init__(self, max_ns: int | None = None) -> None:
        # SPLITVM_SPIN_MAX_NS=0 turns spinning off (bench exit shows what it saves).
        self.max_ns = int(os.environ.get("SPLITVM_SPIN_MAX_NS", DEFAULT_SPIN_MAX_NS)) if max_ns is None else max_ns
        self.recent_ns = 0.0  # moving average of wait lengths, each capped at 2*max_ns
        self.started = 0

    @property
    def budget_ns(self) -> int:
        if self.max_ns == 0 or self.recent_ns >= self.max_ns:
            return 0
        return min(self.max_ns, int(2 * self.recent_ns) + 2_000)

    def spin(self, done: Callable[[], bool]) -> bool:
        clock = time.monotonic_ns
        self.started = start = clock()
        if done():
            self._observe(0)
            return True
        deadline = start + self.budget_ns
        spins = 0
        while clock() < deadline:
            if done():
                self._observe(clock() - start)
                return True
            spins += 1
            if spins % 64 == 0:
                # Two cores, two spinners: let ZeroMQ's I/O threads (which carry every
                # doorbell and completion) run, or a wake-up waits for a scheduler tick.
                os.sched_yield()
        return False

    def woke(self) -> None:
        """After a sleep that followed a missed spin: learn how long the wait really was."""
        self._observe(time.monotonic_ns() - self.started)

    def _observe(self, wait_ns: int) -> None:
        self.recent_ns += 0.25 * (min(wait_ns, 2 * self.max_ns) - self.recent_ns)
