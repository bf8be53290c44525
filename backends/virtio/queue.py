"""Split virtqueues (virtio 1.x, section 2.7) read and written in guest RAM.

Every guest-controlled value is checked before use, as crosvm (split_descriptor_chain.rs)
and Firecracker (queue.rs) check it; a violation raises VirtqueueError and the transport
marks the device DEVICE_NEEDS_RESET (2.1.1) and stops the queue. Nothing here loops on a
guest-chosen count without a bound.

The queue also keeps the in-flight list the crash-recovery scheme rests on: heads taken
from the avail ring and not yet put in the used ring, in the order they were taken (the
idea of vhost-user's inflight region; see blk.py for the whole contract).
"""

from __future__ import annotations

import struct

from vcpu.memory import GuestMemory, GuestMemoryError

# Ring layouts, each declared once (2.7.5, 2.7.6, 2.7.8); all little-endian in 1.x.
DESC = struct.Struct("<QIHH")  # struct virtq_desc {le64 addr; le32 len; le16 flags; le16 next}
AVAIL_HDR = struct.Struct("<HH")  # struct virtq_avail {le16 flags; le16 idx; ...}
AVAIL_ENTRY = struct.Struct("<H")  # virtq_avail.ring[i] (and used_event after the ring)
USED_HDR = struct.Struct("<HH")  # struct virtq_used {le16 flags; le16 idx; ...}
USED_ELEM = struct.Struct("<II")  # struct virtq_used_elem {le32 id; le32 len}

VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT = 1, 2, 4  # 2.7.5
VIRTQ_USED_F_NO_NOTIFY = 1
VIRTQ_AVAIL_F_NO_INTERRUPT = 1  # 2.7.7
# Alignment of each part of a split queue (2.7, table "Virtqueue Part Alignment").
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4
LEGACY_ALIGN = 4096  # legacy layout (2.7.2 "Legacy Interfaces"): used ring on its own page
DEFAULT_QUEUE_MAX = 256
MAX_INDIRECT = 1024  # entries in one indirect table; bounds the walk (Linux never exceeds this)


class VirtqueueError(Exception):
    """The guest broke a virtqueue rule; the device must go to DEVICE_NEEDS_RESET."""


class Chain:
    """One descriptor chain as views of guest RAM: device-readable parts, then writable ones."""

    __slots__ = ("head", "readable", "writable")

    def __init__(self, head: int, readable: list[memoryview], writable: list[memoryview]) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable


class Virtqueue:
    """One split virtqueue; `size`/addresses are written by the transport for the guest."""

    def __init__(self, mem: GuestMemory, max_size: int = DEFAULT_QUEUE_MAX) -> None:
        if max_size <= 0 or max_size & (max_size - 1) or max_size > 32768:
            raise ValueError("queue max size must be a power of two <= 32768 (2.7)")
        self.mem = mem
        self.max_size = max_size
        self.indirect = False  # VIRTIO_F_INDIRECT_DESC negotiated
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.last_avail = 0  # next avail ring slot the device will read (free-running u16)
        self.used_idx = 0  # the used idx the device last wrote (free-running u16)
        self.idle_since: int | None = None  # see VirtioPciFunction.work
        self.in_flight: list[int] = []
        self.kicked = False
        self.broken = False

    # -- set-up by the driver ---------------------------------------------------------
    def set_size(self, value: int) -> None:
        """A guest-written queue size, clamped to the maximum (4.1.4.3: the driver may
        only reduce it); whether it is a power of two is checked at enable."""
        self.size = min(value & 0xFFFF, self.max_size)

    def set_legacy_pfn(self, pfn: int) -> None:
        """Legacy layout (2.7.2): all three parts contiguous from pfn*4096, full size."""
        self.size = self.max_size
        self.desc_addr = pfn * LEGACY_ALIGN
        self.avail_addr = self.desc_addr + DESC.size * self.size
        avail_end = self.avail_addr + AVAIL_HDR.size + AVAIL_ENTRY.size * (self.size + 1)
        self.used_addr = -(-avail_end // LEGACY_ALIGN) * LEGACY_ALIGN
        self.enable()

    def enable(self) -> None:
        """Check the layout once (2.7: sizes and alignment; rings inside RAM), then run."""
        n = self.size
        if n == 0 or n & (n - 1) or n > self.max_size:
            raise VirtqueueError(f"queue size {n} is not a power of two <= {self.max_size}")
        for name, addr, align in (("descriptor table", self.desc_addr, DESC_ALIGN),
                                  ("avail ring", self.avail_addr, AVAIL_ALIGN),
                                  ("used ring", self.used_addr, USED_ALIGN)):
            if addr % align:
                raise VirtqueueError(f"{name} at {addr:#x} not {align}-byte aligned")
        self._check(self.desc_addr, DESC.size * n)
        self._check(self.avail_addr, AVAIL_HDR.size + AVAIL_ENTRY.size * (n + 1))  # + used_event
        self._check(self.used_addr, USED_HDR.size + USED_ELEM.size * n + 2)  # + avail_event
        self.ready = True

    def _check(self, addr: int, length: int) -> None:
        try:
            self.mem.check(addr, length)
        except GuestMemoryError as e:
            raise VirtqueueError(str(e)) from None

    def _slice(self, addr: int, length: int) -> memoryview:
        try:
            return self.mem.slice(addr, length)
        except GuestMemoryError as e:
            raise VirtqueueError(str(e)) from None

    # -- the avail side ---------------------------------------------------------------
    def avail_idx(self) -> int:
        return AVAIL_HDR.unpack_from(self.mem.slice(self.avail_addr, AVAIL_HDR.size))[1]

    def pending(self) -> int:
        """Heads the driver made available that the device has not taken yet."""
        n = (self.avail_idx() - self.last_avail) & 0xFFFF
        if n > self.size:  # 2.7.13.3: the driver cannot be more than a ring ahead
            raise VirtqueueError(f"avail idx moved by {n} > queue size {self.size}")
        return n

    def take(self, limit: int) -> list[int]:
        """Take up to `limit` heads from the avail ring and record them in flight. Nothing
        is read from the chains here: the caller publishes this state before any data moves."""
        n = min(self.pending(), limit, self.size - len(self.in_flight))
        ring = self.avail_addr + AVAIL_HDR.size
        heads = []
        for _ in range(n):
            pos = ring + AVAIL_ENTRY.size * (self.last_avail % self.size)
            (head,) = AVAIL_ENTRY.unpack_from(self.mem.slice(pos, AVAIL_ENTRY.size))
            if head >= self.size:
                raise VirtqueueError(f"avail head {head} >= queue size {self.size}")
            self.last_avail = (self.last_avail + 1) & 0xFFFF
            self.in_flight.append(head)
            heads.append(head)
        return heads

    def chain(self, head: int) -> Chain:
        """Walk a chain (2.7.5), direct or through one indirect table (2.7.5.3)."""
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        table, entries = self.desc_addr, self.size
        index, count, in_table = head, 0, False
        while True:
            if index >= entries:
                raise VirtqueueError(f"descriptor index {index} >= {entries}")
            count += 1
            if count > entries:  # longer than the table can hold: a loop
                raise VirtqueueError(f"descriptor chain from head {head} loops")
            addr, length, flags, nxt = DESC.unpack_from(self._slice(table + DESC.size * index, DESC.size))
            if flags & VIRTQ_DESC_F_INDIRECT:
                # 2.7.5.3.1: no NEXT with INDIRECT, no table inside a table. We also take a
                # table only as the whole chain (what Linux sends); the spec does not need more.
                if not self.indirect or in_table or count != 1 or flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError("indirect descriptor where none is allowed")
                if length == 0 or length % DESC.size or length // DESC.size > MAX_INDIRECT:
                    raise VirtqueueError(f"indirect table length {length} invalid")
                self._check(addr, length)
                table, entries = addr, length // DESC.size
                index, count, in_table = 0, 0, True
                continue
            view = self._slice(addr, length)  # addr+len inside RAM (Python ints: no wrap)
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append(view)
            elif writable:  # 2.7.4.2: device-readable parts come before device-writable ones
                raise VirtqueueError(f"readable descriptor after a writable one (head {head})")
            else:
                readable.append(view)
            if not flags & VIRTQ_DESC_F_NEXT:
                return Chain(head, readable, writable)
            index = nxt

    # -- the used side ----------------------------------------------------------------
    def complete(self, head: int, written: int) -> None:
        """Put one chain in the used ring (2.7.8). The element goes first and the idx after
        it: the idx write is the commit point a restarted device compares against."""
        elem = self.used_addr + USED_HDR.size + USED_ELEM.size * (self.used_idx % self.size)
        USED_ELEM.pack_into(self.mem.slice(elem, USED_ELEM.size), 0, head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.mem.slice(self.used_addr + 2, 2)[:] = self.used_idx.to_bytes(2, "little")
        self.in_flight.remove(head)

    def suppress_notifications(self, on: bool) -> None:
        """2.7.10: VIRTQ_USED_F_NO_NOTIFY asks the driver not to kick while the device
        will look at the avail ring again anyway (it is busy with this queue)."""
        self.mem.slice(self.used_addr, 2)[:] = (VIRTQ_USED_F_NO_NOTIFY if on else 0).to_bytes(2, "little")

    def wants_interrupt(self) -> bool:
        """2.7.7: without EVENT_IDX the driver's NO_INTERRUPT flag suppresses interrupts."""
        flags, _ = AVAIL_HDR.unpack_from(self.mem.slice(self.avail_addr, AVAIL_HDR.size))
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    def ram_used_idx(self) -> int:
        return USED_HDR.unpack_from(self.mem.slice(self.used_addr, USED_HDR.size))[1]

    def reconcile(self) -> int:
        """After a restore: drop the in-flight heads a dead device already completed.

        The snapshot's used_idx is what the device had written when the snapshot was
        published; used idx in RAM may be ahead of it by the completions made after. Those
        entries name heads of our in-flight list; they are done and must not be redone.
        Returns how many were dropped."""
        if not self.ready or self.broken:
            return 0
        ahead = (self.ram_used_idx() - self.used_idx) & 0xFFFF
        if ahead > len(self.in_flight):
            raise VirtqueueError(f"used idx {ahead} ahead of the {len(self.in_flight)} heads in flight")
        for i in range(ahead):
            elem = self.used_addr + USED_HDR.size + USED_ELEM.size * ((self.used_idx + i) % self.size)
            head, _ = USED_ELEM.unpack_from(self.mem.slice(elem, USED_ELEM.size))
            if head not in self.in_flight:
                raise VirtqueueError(f"used ring names head {head}, which was not in flight")
            self.in_flight.remove(head)
        self.used_idx = (self.used_idx + ahead) & 0xFFFF
        return ahead

    # -- state ------------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {"size": self.size, "ready": self.ready, "desc": self.desc_addr, "avail": self.avail_addr,
                "used": self.used_addr, "last_avail": self.last_avail, "used_idx": self.used_idx,
                "in_flight": list(self.in_flight), "kicked": self.kicked, "broken": self.broken,
                "indirect": self.indirect}

    def restore(self, s: dict) -> None:
        self.size, self.ready = s["size"], s["ready"]
        self.desc_addr, self.avail_addr, self.used_addr = s["desc"], s["avail"], s["used"]
        self.last_avail, self.used_idx = s["last_avail"], s["used_idx"]
        self.in_flight = list(s["in_flight"])
        self.kicked, self.broken, self.indirect = s["kicked"], s["broken"], s["indirect"]
