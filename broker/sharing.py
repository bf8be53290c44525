"""The I/O sharing page protocol: the vcpu posts a slot, the backend completes it.

vcpu (steps 3 and 6)                    backend (steps 4 and 5)
  fill slot, seq += 1, state=POSTED         sees POSTED (spinning, or woken)
  ring doorbell if backend_asleep           emulates, writes data
  spin / sleep until state == DONE          state=DONE, send completion if vcpu_asleep
  copy data out, state=FREE

A backend marked failed by the supervisor never completes: the vcpu then completes
the slot itself with all-ones (reads) and counts it in io_page.timeouts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import zmq

from broker.layout import (
    NO_BAR,
    SLOT_DONE,
    SLOT_FREE,
    SLOT_POSTED,
    Mapped,
    ffi,
)
from broker.notify import SLEEP_RECHECK_MS, AdaptiveSpin, drain, ring
from vcpu.memory import fence

# A posted slot whose backend is restarting waits; once the supervisor marks the
# backend failed, the slot is completed with all-ones within this bound.
FAILED_BACKEND_GRACE_S = 0.05


@dataclass
class Timing:
    """One trapped access, CLOCK_MONOTONIC ns at each step boundary."""

    device: str
    kind: int
    addr: int
    size: int
    is_write: bool
    t_exit: int
    count: int = 1
    t_post: int = 0
    t_backend: int = 0
    t_done: int = 0
    t_seen: int = 0
    t_resume: int = 0


@dataclass
class SlotClient:
    """The vcpu side of one backend's sharing page, for one vCPU thread."""

    name: str
    page: Mapped
    cpu: int
    doorbell: zmq.Socket
    completion: zmq.Socket
    spin: AdaptiveSpin = field(default_factory=AdaptiveSpin)

    def access(
        self, kind: int, addr: int, size: int, is_write: bool, data: bytes, count: int = 1, bar: int = NO_BAR,
        timing: Timing | None = None,
    ) -> bytes:
        page = self.page.ptr
        slot = page.slots[self.cpu]
        nbytes = size * count
        if page.failed:
            page.timeouts += 1
            return b"\xff" * nbytes
        slot.kind = kind
        slot.addr = addr
        slot.size = size
        slot.count = count
        slot.bar = bar
        slot.is_write = 1 if is_write else 0
        slot.failed = 0
        if is_write:
            ffi.memmove(slot.data, data, nbytes)
        slot.seq += 1
        slot.vcpu_asleep = 0
        if timing is not None:
            slot.t_exit = timing.t_exit
            slot.t_post = timing.t_post = time.monotonic_ns()
        slot.state = SLOT_POSTED  # the store that hands the slot over
        fence()  # ... seen before we read the backend's asleep flag (Dekker: it does the mirror)
        if page.backend_asleep:
            ring(self.doorbell, b"%d" % self.cpu)
        if not self.spin.spin(lambda: slot.state == SLOT_DONE):
            self._sleep(page, slot, nbytes)
            self.spin.woke()
        if timing is not None:
            timing.t_backend = slot.t_backend
            timing.t_done = slot.t_done
            timing.t_seen = time.monotonic_ns()
        result = b"" if is_write else bytes(ffi.buffer(slot.data, nbytes))
        slot.state = SLOT_FREE
        return result

    def _sleep(self, page: object, slot: object, nbytes: int) -> None:
        slot.vcpu_asleep = 1
        fence()
        failed_since = None
        while slot.state != SLOT_DONE:
            if self.completion.poll(SLEEP_RECHECK_MS, zmq.POLLIN):
                drain(self.completion)
            if page.backend_asleep and slot.state == SLOT_POSTED:
                ring(self.doorbell, b"%d" % self.cpu)
            if page.failed:
                failed_since = failed_since or time.monotonic()
                if time.monotonic() - failed_since > FAILED_BACKEND_GRACE_S and slot.state != SLOT_DONE:
                    ffi.memmove(slot.data, b"\xff" * nbytes, nbytes)
                    slot.failed = 1
                    page.timeouts += 1
                    slot.state = SLOT_DONE
        slot.vcpu_asleep = 0
        drain(self.completion)
