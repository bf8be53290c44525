"""virtio-blk (virtio 1.x, section 5.2) over the virtio-pci transport.

Crash recovery (the idea of vhost-user's inflight region, QEMU docs/interop/vhost-user.rst
"Inflight I/O tracking"; replaying from the avail idx instead loses requests, as
cloud-hypervisor #8592 found). The host publishes snapshot() after every access and every
work() call; a process may die at any instruction in between. The snapshot holds, per
queue, last_avail_idx, the used idx this device last wrote and the heads taken from the
avail ring but not yet in the used ring, in order. So a work() call:
  1. completes the heads that were in flight when it began (they are in the published
     snapshot): I/O that is idempotent (pread into / pwrite from guest buffers), then the
     used element, then used idx (the commit point), then drops the head from in-flight;
  2. then takes a new batch from the avail ring and only records it; the snapshot
     published when the call returns holds it before any of its data moves.
A death during (2) loses nothing: the heads are still in the avail ring past the published
last_avail_idx and are taken again. A death during (1) leaves used idx in RAM ahead of the
snapshot's by the completions already made: restore() reads their ids from the used ring
and drops them from in-flight (they are NOT redone), and every remaining in-flight head is
processed again, once. Every request thus reaches the used ring exactly once.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import cffi

from backends.block import SECTOR, BlockImage
from backends.virtio.pci import VirtioPciFunction
from backends.virtio.queue import DEFAULT_QUEUE_MAX, Chain
from vcpu.memory import GuestMemory

VIRTIO_ID_BLOCK = 2
VIRTIO_BLK_PCI_DEVICE = 0x1001  # transitional virtio-blk (4.1.2.3)
VIRTIO_BLK_CLASS = 0x010000  # mass storage, SCSI (what QEMU reports)
# Feature bits (5.2.3).
VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH = 1 << 2, 1 << 5, 1 << 6, 1 << 9
VIRTIO_BLK_F_CONFIG_WCE = 1 << 11  # the cache mode is in config `writeback`, and the driver may set it
# Request types and status values (5.2.6).
VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID = 0, 1, 4, 8
VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP = 0, 1, 2
VIRTIO_BLK_ID_BYTES = 20
BATCH = 64  # heads taken (and completed) per work() call: the bounded chunk

REQ_HDR = struct.Struct("<IIQ")  # struct virtio_blk_req header {le32 type; le32 reserved; le64 sector}

ffi = cffi.FFI()
ffi.cdef("""
struct virtio_blk_config {
    uint64_t capacity; uint32_t size_max; uint32_t seg_max;
    struct { uint16_t cylinders; uint8_t heads; uint8_t sectors; } geometry;
    uint32_t blk_size;
    uint8_t physical_block_exp; uint8_t alignment_offset; uint16_t min_io_size; uint32_t opt_io_size;
    uint8_t writeback; uint8_t unused0; uint16_t num_queues;
};
""")
WRITEBACK_OFF = ffi.offsetof("struct virtio_blk_config", "writeback")


def _split(views: list[memoryview], n: int) -> tuple[list[memoryview], list[memoryview]]:
    """The first n bytes of a scatter list and the rest, as views (no copy)."""
    head: list[memoryview] = []
    rest: list[memoryview] = []
    for v in views:
        if n >= len(v):
            head.append(v)
            n -= len(v)
        elif n > 0:
            head.append(v[:n])
            rest.append(v[n:])
            n = 0
        else:
            rest.append(v)
    return head, rest


def _total(views: list[memoryview]) -> int:
    return sum(len(v) for v in views)


class VirtioBlk(VirtioPciFunction):
    kind = "virtio-blk"

    def __init__(self, mem: GuestMemory, image: BlockImage, irq: Callable[[bool], None], serial: str = "",
                 readonly: bool = False, *, irq_line: int = 0, queue_max: int = DEFAULT_QUEUE_MAX) -> None:
        self.image = image
        self.readonly = readonly or image.readonly
        self.serial = serial.encode()[:VIRTIO_BLK_ID_BYTES]
        cfg = ffi.new("struct virtio_blk_config *")
        cfg.capacity = image.size // SECTOR  # always in 512-byte sectors (5.2.4)
        cfg.seg_max = queue_max - 2  # a request also needs its header and status
        cfg.blk_size = SECTOR
        cfg.num_queues = 1
        self._config = cfg
        # 5.2.4: writeback 1 = a writeback cache (a completed write may still be volatile until
        # FLUSH), 0 = writethrough. A write-through image (O_DSYNC) starts at 0, as QEMU's does.
        self.writeback = not image.write_through
        features = VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_CONFIG_WCE
        if self.readonly:
            features |= VIRTIO_BLK_F_RO
        super().__init__(mem, irq, virtio_type=VIRTIO_ID_BLOCK, pci_device=VIRTIO_BLK_PCI_DEVICE,
                         class_code=VIRTIO_BLK_CLASS, features=features, num_queues=1, queue_max=queue_max,
                         irq_line=irq_line)

    def config_bytes(self) -> bytes:
        self._config.writeback = int(self.writeback)
        return bytes(ffi.buffer(self._config))

    def config_write(self, offset: int, data: bytes) -> None:
        """The one writable field: `writeback`, once VIRTIO_BLK_F_CONFIG_WCE is negotiated (5.2.5)."""
        at = WRITEBACK_OFF - offset
        if self.driver_features & VIRTIO_BLK_F_CONFIG_WCE and 0 <= at < len(data):
            self.writeback = bool(data[at] & 1)

    def device_reset(self) -> None:
        self.writeback = not self.image.write_through

    def device_snapshot(self) -> dict:
        return {"writeback": self.writeback}

    def device_restore(self, state: dict) -> None:
        self.writeback = bool(state["writeback"])

    def process_queue(self, index: int) -> bool:
        """Complete what was in flight when this call began, then take (record only) the
        next batch. See the module comment for why the two never mix within one call."""
        q = self.queues[index]
        for head in q.in_flight[:BATCH]:
            q.complete(head, self._serve(q.chain(head)))
        q.take(BATCH)
        return bool(q.in_flight) or q.pending() > 0

    def _serve(self, chain: Chain) -> int:
        """One request (5.2.6): header in the readable part, status in the last writable
        byte, data between. Returns the bytes written into the chain (the used len)."""
        if _total(chain.readable) < REQ_HDR.size or _total(chain.writable) < 1:
            return 0  # malformed, and nowhere to put a status: complete it empty
        hdr, data_out = _split(chain.readable, REQ_HDR.size)
        data_in, status = _split(chain.writable, _total(chain.writable) - 1)
        rtype, _, sector = REQ_HDR.unpack(b"".join(hdr))  # 16 bytes of header, not data
        written = 0
        if rtype == VIRTIO_BLK_T_IN:
            code = self._rw(sector, data_in, write=False)
            written = _total(data_in) if code == VIRTIO_BLK_S_OK else 0
        elif rtype == VIRTIO_BLK_T_OUT:
            code = VIRTIO_BLK_S_IOERR if self.readonly else self._rw(sector, data_out, write=True)
        elif rtype == VIRTIO_BLK_T_FLUSH:
            code = self._flush()
        elif rtype == VIRTIO_BLK_T_GET_ID:
            ident = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
            for v in data_in:  # at most 20 bytes, as far as the driver's buffer goes
                n = min(len(v), len(ident) - written)
                v[:n] = ident[written : written + n]
                written += n
            code = VIRTIO_BLK_S_OK
        else:
            code = VIRTIO_BLK_S_UNSUPP
        status[-1][0] = code
        return written + 1

    def _rw(self, sector: int, buffers: list[memoryview], write: bool) -> int:
        length = _total(buffers)
        offset = sector * SECTOR
        if length % SECTOR or offset + length > (self.image.size // SECTOR) * SECTOR:
            return VIRTIO_BLK_S_IOERR
        try:
            if write:
                self.image.write_from(offset, buffers)
                if not self.writeback and not self.image.write_through:
                    self.image.flush()  # writethrough: OK only once the data is on stable storage
            else:
                self.image.read_into(offset, buffers)
        except OSError:
            return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK

    def _flush(self) -> int:
        try:
            self.image.flush()
        except OSError:
            return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK

