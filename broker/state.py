"""The device-state region: model state that outlives a backend process.

Serving a request computes the new model state and result, writes the state into
the inactive buffer with the slot's seq, then publishes with one aligned 8-byte store
of `generation` (DESIGN.md "Restart contract"). Death before the store: the old
state stands and the request runs again. Death after it: last_seq shows the request
was applied, and its result is already in the slot's data.

Console output is *staged*: bytes go into out_ring ahead of the published out_head,
and the supervisor, which does not die with the backend, drains up to the published
head. A replayed request writes the same bytes at the same place.
"""

from __future__ import annotations

import struct
import time

import msgpack

from broker.layout import IN_RING, MAX_VCPUS, OUT_RING, STATE_MODEL_BYTES, Mapped, ffi


class StateTooLarge(RuntimeError):
    pass


class StateStore:
    """Backend side: load the published state, stage output, publish new states."""

    def __init__(self, region: Mapped) -> None:
        self.region = region
        r = region.ptr
        cur = r.buf[r.generation & 1]
        self.last_seq = [cur.last_seq[i] for i in range(MAX_VCPUS)]
        self.out_head = cur.out_head
        self.in_tail = cur.in_tail
        self.model_state = msgpack.unpackb(bytes(ffi.buffer(cur.model, cur.model_len))) if cur.model_len else None
        self.last_blob = bytes(ffi.buffer(cur.model, cur.model_len))
        self.last_seq_packed = struct.pack(f"<{MAX_VCPUS}Q", *self.last_seq)

    def applied(self, slot: int, seq: int) -> bool:
        return self.last_seq[slot] == seq

    def stage_output(self, data: bytes) -> None:
        """Put bytes after the pending out_head; wait while the supervisor drains."""
        r = self.region.ptr
        for b in data:
            while self.out_head - r.out_tail >= OUT_RING:
                time.sleep(0.0005)  # the supervisor drains; it outlives us
            r.out_ring[self.out_head % OUT_RING] = b
            self.out_head += 1

    def input_available(self) -> int:
        return self.region.ptr.in_head - self.in_tail

    def take_input(self, n: int) -> bytes:
        r = self.region.ptr
        n = min(n, r.in_head - self.in_tail)
        out = bytes(r.in_ring[(self.in_tail + i) % IN_RING] for i in range(n))
        self.in_tail += n
        return out

    def publish(self, model_state: object, slot: int | None = None, seq: int = 0) -> None:
        r = self.region.ptr
        gen = r.generation
        nxt = r.buf[(gen + 1) & 1]
        blob = msgpack.packb(model_state)
        if (slot is None and blob == self.last_blob and self.out_head == r.buf[gen & 1].out_head
                and self.in_tail == r.buf[gen & 1].in_tail):
            return  # nothing changed (an idle poll): the published state already says it
        self.last_blob = blob
        if len(blob) > STATE_MODEL_BYTES:
            raise StateTooLarge(f"model state {len(blob)} bytes > {STATE_MODEL_BYTES}")
        if slot is not None:
            self.last_seq[slot] = seq
            self.last_seq_packed = struct.pack(f"<{MAX_VCPUS}Q", *self.last_seq)
        ffi.memmove(nxt.last_seq, self.last_seq_packed, len(self.last_seq_packed))
        nxt.out_head = self.out_head
        nxt.in_tail = self.in_tail
        ffi.memmove(nxt.model, blob, len(blob))
        nxt.model_len = len(blob)
        r.generation = gen + 1  # the one aligned 8-byte store that publishes


class StateReader:
    """Supervisor side: drain staged output, feed input."""

    def __init__(self, region: Mapped) -> None:
        self.region = region

    def published_out_head(self) -> int:
        r = self.region.ptr
        while True:
            gen = r.generation
            head = r.buf[gen & 1].out_head
            if r.generation == gen:
                return head

    def drain_output(self) -> bytes:
        r = self.region.ptr
        head = self.published_out_head()
        tail = r.out_tail
        if head == tail:
            return b""
        start, end = tail % OUT_RING, head % OUT_RING
        ring = ffi.buffer(r.out_ring, OUT_RING)
        data = bytes(ring[start:end]) if start < end else bytes(ring[start:]) + bytes(ring[:end])
        r.out_tail = head
        return data

    def feed_input(self, data: bytes) -> int:
        """Append what fits of `data` to the input ring; return how many bytes."""
        r = self.region.ptr
        consumed = r.buf[r.generation & 1].in_tail
        room = IN_RING - (r.in_head - consumed)
        n = min(room, len(data))
        for i in range(n):
            r.in_ring[(r.in_head + i) % IN_RING] = data[i]
        r.in_head += n
        return n
