"""virtio core + virtio-blk model, sans-I/O: a small driver in this file talks to the
model through its BARs (modern common cfg on BAR4, legacy header on BAR0), builds
virtqueues in a real memfd-backed GuestMemory and checks used rings, status bytes, guest
RAM and the raw image file. Includes hostile rings and the crash-restart contract."""

from __future__ import annotations

import hashlib
import os
import random
import time

import msgpack
import pytest
from test_block import CountingImage

from backends.block import BlockImage
from backends.virtio import pci as vpci
from backends.virtio.blk import (
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VirtioBlk,
)
from backends.virtio.queue import (
    AVAIL_ENTRY,
    AVAIL_HDR,
    DESC,
    USED_ELEM,
    USED_HDR,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from vcpu.memory import GuestMemory, create_ram_fd

RAM_SIZE = 4 << 20
IMAGE_SIZE = 1 << 20
QSIZE = 64
DESC_GPA, AVAIL_GPA, USED_GPA = 0x10000, 0x12000, 0x13000
LEGACY_PFN = 0x20  # legacy rings at 0x20000..
HEAP_GPA = 0x100000
STATE_MODEL_BYTES = 16384  # broker.layout's limit for a published model state
MODERN, LEGACY = vpci.MODERN_BAR, vpci.LEGACY_BAR
LEG = {name: off for name, off, _ in vpci.LEGACY.fields}


def common_off(name: str) -> int:
    return vpci.ffi.offsetof("struct virtio_pci_common_cfg", name)


class Died(BaseException):
    """A simulated process death in the middle of work()."""


class DyingImage(BlockImage):
    def __init__(self, fd: int, ios_left: int) -> None:
        super().__init__(fd)
        self.ios_left = ios_left

    def _tick(self) -> None:
        if self.ios_left == 0:
            raise Died
        self.ios_left -= 1

    def read_into(self, offset: int, buffers: list[memoryview]) -> int:
        self._tick()
        return super().read_into(offset, buffers)

    def write_from(self, offset: int, buffers: list[memoryview]) -> int:
        self._tick()
        return super().write_from(offset, buffers)


class Driver:
    """Just enough of a virtio driver (3.1) to exercise the device."""

    def __init__(self, dev: VirtioBlk, mem: GuestMemory, legacy: bool = False) -> None:
        self.dev, self.mem, self.legacy = dev, mem, legacy
        self.desc, self.avail, self.used = DESC_GPA, AVAIL_GPA, USED_GPA
        self.qsize = QSIZE
        self.next_desc = 0
        self.avail_idx = 0
        self.seen_used = 0
        self.heap = HEAP_GPA

    # -- register access --------------------------------------------------------------
    def rd(self, bar: int, off: int, size: int) -> int:
        return int.from_bytes(self.dev.bar_access(bar, off, size, False, b""), "little")

    def wr(self, bar: int, off: int, size: int, value: int) -> None:
        self.dev.bar_access(bar, off, size, True, value.to_bytes(size, "little"))

    def cr(self, name: str, size: int) -> int:
        return self.rd(MODERN, common_off(name), size)

    def cw(self, name: str, size: int, value: int) -> None:
        self.wr(MODERN, common_off(name), size, value)

    def status(self) -> int:
        return self.rd(LEGACY, LEG["status"], 1) if self.legacy else self.cr("device_status", 1)

    # -- initialisation (3.1.1) --------------------------------------------------------
    def init_modern(self, features: int | None = None, qsize: int = QSIZE) -> bool:
        self.qsize = qsize
        self.cw("device_status", 1, 0)
        self.cw("device_status", 1, vpci.ACKNOWLEDGE)
        self.cw("device_status", 1, vpci.ACKNOWLEDGE | vpci.DRIVER)
        offered = 0
        for sel in (0, 1):
            self.cw("device_feature_select", 4, sel)
            offered |= self.cr("device_feature", 4) << (32 * sel)
        self.offered = offered
        want = offered if features is None else features
        for sel in (0, 1):
            self.cw("driver_feature_select", 4, sel)
            self.cw("driver_feature", 4, (want >> (32 * sel)) & 0xFFFFFFFF)
        self.cw("device_status", 1, vpci.ACKNOWLEDGE | vpci.DRIVER | vpci.FEATURES_OK)
        if not self.cr("device_status", 1) & vpci.FEATURES_OK:
            return False
        self.cw("queue_select", 2, 0)
        assert self.cr("queue_size", 2) == 256
        self.cw("queue_size", 2, qsize)
        for name, addr in (("queue_desc", self.desc), ("queue_driver", self.avail), ("queue_device", self.used)):
            off = common_off(name)  # as two dwords, as Linux's vp_iowrite64_twopart does
            self.wr(MODERN, off, 4, addr & 0xFFFFFFFF)
            self.wr(MODERN, off + 4, 4, addr >> 32)
        self.clear_rings()
        self.cw("queue_enable", 2, 1)
        self.cw("device_status", 1, vpci.ACKNOWLEDGE | vpci.DRIVER | vpci.FEATURES_OK | vpci.DRIVER_OK)
        return True

    def init_legacy(self) -> None:
        self.wr(LEGACY, LEG["status"], 1, 0)
        self.wr(LEGACY, LEG["status"], 1, vpci.ACKNOWLEDGE | vpci.DRIVER)
        self.offered = self.rd(LEGACY, LEG["host_features"], 4)
        self.wr(LEGACY, LEG["guest_features"], 4, self.offered)
        self.wr(LEGACY, LEG["queue_select"], 2, 0)
        self.qsize = self.rd(LEGACY, LEG["queue_size"], 2)
        self.desc = LEGACY_PFN << 12  # legacy layout (2.7.2)
        self.avail = self.desc + 16 * self.qsize
        self.used = -(-(self.avail + 6 + 2 * self.qsize) // 4096) * 4096
        self.clear_rings()
        self.wr(LEGACY, LEG["queue_pfn"], 4, LEGACY_PFN)
        self.wr(LEGACY, LEG["status"], 1, vpci.ACKNOWLEDGE | vpci.DRIVER | vpci.DRIVER_OK)

    def clear_rings(self) -> None:
        self.mem.write(self.desc, bytes(16 * self.qsize))
        self.mem.write(self.avail, bytes(6 + 2 * self.qsize))
        self.mem.write(self.used, bytes(6 + 8 * self.qsize))
        self.next_desc = self.avail_idx = self.seen_used = 0

    # -- requests ------------------------------------------------------------------------
    def alloc(self, size: int) -> int:
        gpa = self.heap
        self.heap += -(-max(size, 1) // 64) * 64
        return gpa

    def put_desc(self, index: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.mem.write(self.desc + 16 * index, DESC.pack(addr, length, flags, nxt))

    def chain(self, parts: list[tuple[int, int, bool]]) -> int:
        """Descriptors for (addr, len, writable) parts; returns the head."""
        idx = [(self.next_desc + i) % self.qsize for i in range(len(parts))]
        self.next_desc += len(parts)
        for i, (addr, length, writable) in enumerate(parts):
            last = i == len(parts) - 1
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.put_desc(idx[i], addr, length, flags, 0 if last else idx[i + 1])
        return idx[0]

    def request(self, rtype: int, sector: int = 0, data: bytes | int = 0) -> dict:
        """A blk request: header, data (bytes to write, or a length to read), status."""
        hdr = self.alloc(16)
        self.mem.write(hdr, (rtype).to_bytes(4, "little") + bytes(4) + sector.to_bytes(8, "little"))
        parts = [(hdr, 16, False)]
        length = len(data) if isinstance(data, bytes) else data
        buf = self.alloc(length) if length else 0
        if isinstance(data, bytes):
            self.mem.write(buf, data)
            if length:
                parts.append((buf, length, False))
        elif length:
            parts.append((buf, length, True))
        status = self.alloc(1)
        self.mem.write(status, b"\xee")
        parts.append((status, 1, True))
        return {"head": self.chain(parts), "buf": buf, "len": length, "status": status}

    def publish(self, heads: list[int]) -> None:
        for h in heads:
            pos = self.avail + AVAIL_HDR.size + AVAIL_ENTRY.size * (self.avail_idx % self.qsize)
            self.mem.write(pos, AVAIL_ENTRY.pack(h))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        self.mem.write(self.avail + 2, (value & 0xFFFF).to_bytes(2, "little"))

    def kick(self) -> None:
        if self.legacy:
            self.wr(LEGACY, LEG["queue_notify"], 2, 0)
        else:
            self.wr(MODERN, vpci.NOTIFY_OFF, 2, 0)

    def run(self, limit_s: float = 5.0) -> int:
        """work() until the device is idle (its ring-polling window, IDLE_POLL_NS, included)."""
        deadline = time.monotonic() + limit_s
        n = 1
        while self.dev.work():
            n += 1
            if time.monotonic() > deadline:
                raise AssertionError("work() never finished")
        return n

    def submit(self, reqs: list[dict]) -> None:
        self.publish([r["head"] for r in reqs])
        self.kick()
        self.run()

    def used_idx(self) -> int:
        return USED_HDR.unpack(self.mem.read(self.used, 4))[1]

    def new_used(self) -> list[tuple[int, int]]:
        out = []
        end = self.used_idx()
        while self.seen_used != end:
            pos = self.used + USED_HDR.size + USED_ELEM.size * (self.seen_used % self.qsize)
            out.append(USED_ELEM.unpack(self.mem.read(pos, 8)))
            self.seen_used = (self.seen_used + 1) & 0xFFFF
        return out

    def status_of(self, req: dict) -> int:
        return self.mem.read(req["status"], 1)[0]


# -- fixtures ---------------------------------------------------------------------------
@pytest.fixture
def mem():
    fd = create_ram_fd(RAM_SIZE, "test-virtio")
    m = GuestMemory(fd, RAM_SIZE)
    yield m
    m.close()
    os.close(fd)


@pytest.fixture
def image_path(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(random.Random(1).randbytes(IMAGE_SIZE))
    return p


@pytest.fixture
def fds():
    opened: list[int] = []
    yield opened
    for fd in opened:
        os.close(fd)


class Irq:
    def __init__(self) -> None:
        self.changes: list[bool] = []

    def __call__(self, level: bool) -> None:
        self.changes.append(level)

    @property
    def level(self) -> bool:
        return bool(self.changes) and self.changes[-1]


def open_image(path, fds: list[int], readonly: bool = False) -> BlockImage:
    fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
    fds.append(fd)
    return BlockImage(fd, readonly=readonly)


@pytest.fixture
def blk(mem, image_path, fds):
    irq = Irq()
    dev = VirtioBlk(mem, open_image(image_path, fds), irq, serial="splitvm-disk-0")
    dev.test_irq = irq
    return dev


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# -- PCI identity and capabilities -----------------------------------------------------------
def test_pci_identity_and_capabilities(blk):
    c = blk.config
    assert (c(0, 2, False, 0), c(2, 2, False, 0)) == (0x1AF4, 0x1001)
    assert c(0x08, 4, False, 0) >> 8 == 0x010000 and c(0x08, 1, False, 0) == 0  # class, revision 0
    assert (c(0x2C, 2, False, 0), c(0x2E, 2, False, 0)) == (0x1AF4, 2)
    assert c(0x06, 2, False, 0) & 0x10 and c(0x3D, 1, False, 0) == 1
    caps, pos = {}, c(0x34, 1, False, 0)
    for _ in range(48):  # a bounded walk: a broken list must not hang the test
        if not pos:
            break
        assert c(pos, 1, False, 0) == 0x09
        cfg_type, bar = c(pos + 3, 1, False, 0), c(pos + 4, 1, False, 0)
        caps[cfg_type] = (bar, c(pos + 8, 4, False, 0), c(pos + 12, 4, False, 0), pos)
        pos = c(pos + 1, 1, False, 0)
    assert set(caps) == {1, 2, 3, 4} and all(v[0] == 4 for v in caps.values())
    assert caps[1][1:3] == (0x0, 56) and caps[3][1] == 0x1000 and caps[4][1] == 0x2000 and caps[2][1] == 0x3000
    assert c(caps[2][3] + 16, 4, False, 0) == 4  # notify_off_multiplier
    c(0x40, 4, True, 0)  # capabilities are read-only
    assert c(0x40, 1, False, 0) == 0x09
    bars = {m.index: m for m in blk.pci.bar_map()}
    assert bars[0].io and bars[0].size >= 0x14 + len(blk.config_bytes()) and bars[4].size == 0x4000


# -- modern transport + the request types ------------------------------------------------------
def test_modern_requests(blk, mem, image_path):
    d = Driver(blk, mem)
    assert d.init_modern()
    assert d.offered & vpci.VIRTIO_F_VERSION_1
    for bit in (VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH):
        assert d.offered & bit
    assert not d.offered & VIRTIO_BLK_F_RO
    capacity = int.from_bytes(blk.bar_access(MODERN, 0x2000, 8, False, b""), "little")
    assert capacity == IMAGE_SIZE // 512
    assert int.from_bytes(blk.bar_access(MODERN, 0x2000 + 20, 4, False, b""), "little") == 512  # blk_size

    expected = bytearray(image_path.read_bytes())
    payload = random.Random(2).randbytes(1024)
    w = d.request(VIRTIO_BLK_T_OUT, 10, payload)
    d.submit([w])
    assert d.new_used() == [(w["head"], 1)]
    expected[10 * 512 : 12 * 512] = payload
    r = d.request(VIRTIO_BLK_T_IN, 9, 2048)
    f = d.request(VIRTIO_BLK_T_FLUSH)
    g = d.request(VIRTIO_BLK_T_GET_ID, 0, 20)
    u = d.request(99)
    oob = d.request(VIRTIO_BLK_T_IN, IMAGE_SIZE // 512 - 1, 1024)  # runs past the end
    odd = d.request(VIRTIO_BLK_T_IN, 0, 100)  # not a multiple of 512
    d.submit([r, f, g, u, oob, odd])
    assert d.new_used() == [(r["head"], 2049), (f["head"], 1), (g["head"], 21), (u["head"], 1),
                    (oob["head"], 1), (odd["head"], 1)]
    assert [d.status_of(x) for x in (w, r, f, g, u, oob, odd)] == [VIRTIO_BLK_S_OK] * 4 + [
        VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_IOERR]
    assert mem.read(r["buf"], 2048) == bytes(expected[9 * 512 : 13 * 512])
    assert mem.read(g["buf"], 20) == b"splitvm-disk-0".ljust(20, b"\0")
    assert sha(image_path.read_bytes()) == sha(bytes(expected))
    assert blk.irq_level() and blk.test_irq.level


def test_legacy_transport(blk, mem, image_path):
    d = Driver(blk, mem, legacy=True)
    d.init_legacy()
    assert d.qsize == 256 and not d.offered & 0xFFFFFFFF00000000
    assert d.offered & VIRTIO_BLK_F_FLUSH
    assert int.from_bytes(blk.bar_access(LEGACY, 0x14, 8, False, b""), "little") == IMAGE_SIZE // 512
    payload = b"legacy!!" * 64
    w = d.request(VIRTIO_BLK_T_OUT, 3, payload)
    r = d.request(VIRTIO_BLK_T_IN, 3, 512)
    d.submit([w])
    d.submit([r])
    assert d.new_used() == [(w["head"], 1), (r["head"], 513)]
    assert mem.read(r["buf"], 512) == payload
    assert image_path.read_bytes()[3 * 512 : 4 * 512] == payload
    assert blk.test_irq.level
    assert d.rd(LEGACY, LEG["isr"], 1) == 1  # ISR read clears and lowers the line
    assert not blk.irq_level() and blk.test_irq.changes[-1] is False
    assert d.rd(LEGACY, LEG["isr"], 1) == 0
    d.wr(LEGACY, LEG["status"], 1, 0)  # reset
    assert d.status() == 0 and not blk.queues[0].ready


def test_isr_read_clears_modern(blk, mem):
    d = Driver(blk, mem)
    d.init_modern()
    d.submit([d.request(VIRTIO_BLK_T_FLUSH)])
    assert blk.test_irq.changes == [True]
    assert d.rd(MODERN, vpci.ISR_OFF, 1) == vpci.ISR_QUEUE
    assert blk.test_irq.changes == [True, False] and not blk.irq_level()
    assert d.rd(MODERN, vpci.ISR_OFF, 1) == 0


def test_no_interrupt_flag_suppresses(blk, mem):
    d = Driver(blk, mem)
    d.init_modern()
    mem.write(d.avail, AVAIL_HDR.pack(VIRTQ_AVAIL_F_NO_INTERRUPT, 0))
    d.submit([d.request(VIRTIO_BLK_T_FLUSH)])
    assert len(d.new_used()) == 1 and blk.test_irq.changes == []


def test_sixteen_in_flight_per_kick(blk, mem, image_path):
    d = Driver(blk, mem)
    d.init_modern()
    reqs = [d.request(VIRTIO_BLK_T_IN, 7 * i, 4096) for i in range(16)]
    d.publish([r["head"] for r in reqs])
    d.kick()
    assert blk.work() is True  # the first call only takes and records the heads
    assert d.used_idx() == 0 and blk.snapshot()["queues"][0]["in_flight"] == [r["head"] for r in reqs]
    blk.work()  # completes all sixteen (then it polls the ring a few idle rounds)
    assert [h for h, _ in d.new_used()] == [r["head"] for r in reqs]
    image = image_path.read_bytes()
    for i, r in enumerate(reqs):
        assert sha(mem.read(r["buf"], 4096)) == sha(image[7 * i * 512 : 7 * i * 512 + 4096])
        assert d.status_of(r) == VIRTIO_BLK_S_OK


def test_indirect_descriptors(blk, mem):
    d = Driver(blk, mem)
    d.init_modern()
    hdr, buf, st, table = d.alloc(16), d.alloc(1024), d.alloc(1), d.alloc(48)
    mem.write(hdr, VIRTIO_BLK_T_IN.to_bytes(4, "little") + bytes(12))
    mem.write(table, DESC.pack(hdr, 16, VIRTQ_DESC_F_NEXT, 1) + DESC.pack(buf, 1024, 3, 2)
              + DESC.pack(st, 1, VIRTQ_DESC_F_WRITE, 0))
    d.put_desc(0, table, 48, VIRTQ_DESC_F_INDIRECT)
    d.publish([0])
    d.kick()
    d.run()
    assert d.new_used() == [(0, 1025)] and mem.read(st, 1)[0] == VIRTIO_BLK_S_OK


def test_readonly(mem, image_path, fds):
    dev = VirtioBlk(mem, open_image(image_path, fds, readonly=True), Irq())
    d = Driver(dev, mem)
    d.init_modern()
    assert d.offered & VIRTIO_BLK_F_RO
    before = sha(image_path.read_bytes())
    w = d.request(VIRTIO_BLK_T_OUT, 0, b"x" * 512)
    r = d.request(VIRTIO_BLK_T_IN, 0, 512)
    d.submit([w, r])
    assert [d.status_of(w), d.status_of(r)] == [VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK]
    assert sha(image_path.read_bytes()) == before


def test_feature_negotiation_refusals(blk, mem):
    d = Driver(blk, mem)
    assert not d.init_modern(features=VIRTIO_BLK_F_FLUSH)  # modern without VERSION_1
    assert not d.init_modern(features=vpci.VIRTIO_F_VERSION_1 | (1 << 40))  # a bit never offered
    assert d.init_modern(features=vpci.VIRTIO_F_VERSION_1)
    d.cw("driver_feature_select", 4, 0)
    d.cw("driver_feature", 4, 0xFFFFFFFF)  # after FEATURES_OK: ignored
    assert blk.driver_features == vpci.VIRTIO_F_VERSION_1


def test_guest_indices_clamped(blk, mem):
    d = Driver(blk, mem)
    d.init_modern()
    for sel in (1, 0x7FFF, 0xFFFF):  # CVE-2011-2512: no negative or large index reaches a list
        d.cw("queue_select", 2, sel)
        assert d.cr("queue_size", 2) == 0 and d.cr("queue_desc", 8) == 0
        d.cw("queue_size", 2, 16)
        d.cw("queue_enable", 2, 1)
    d.wr(LEGACY, LEG["queue_notify"], 2, 0xFFFF)
    d.wr(MODERN, vpci.NOTIFY_OFF + 0xFFC, 4, 0xFFFFFFFF)
    d.wr(LEGACY, LEG["queue_pfn"], 4, 0x1234)
    assert d.cr("num_queues", 2) == 1
    assert blk.work() is False and not d.status() & vpci.DEVICE_NEEDS_RESET
    d.cw("queue_select", 2, 0)
    d.cw("queue_size", 2, 4096)  # enabled queue: the write is ignored
    assert d.cr("queue_size", 2) == QSIZE
    assert blk.bar_access(2, 0, 4, False, b"") == b"\xff" * 4


# -- hostile rings --------------------------------------------------------------------------------
def _loop(d: Driver) -> list[int]:
    d.put_desc(0, d.alloc(16), 16, VIRTQ_DESC_F_NEXT, 1)
    d.put_desc(1, d.alloc(16), 16, VIRTQ_DESC_F_NEXT, 0)
    return [0]


def _bad_next(d: Driver) -> list[int]:
    d.put_desc(0, d.alloc(16), 16, VIRTQ_DESC_F_NEXT, QSIZE)
    return [0]


def _bad_head(d: Driver) -> list[int]:
    return [QSIZE + 3]


def _outside_ram(d: Driver) -> list[int]:
    d.put_desc(0, RAM_SIZE - 8, 16, 0)
    return [0]


def _huge_len(d: Driver) -> list[int]:
    d.put_desc(0, 0x1000, 0xFFFFFFFF, 0)
    return [0]


def _len_wraps(d: Driver) -> list[int]:
    d.put_desc(0, (1 << 64) - 0x10, 0x100, 0)  # addr + len passes 2^64
    return [0]


def _readable_after_writable(d: Driver) -> list[int]:
    d.put_desc(0, d.alloc(1), 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
    d.put_desc(1, d.alloc(16), 16, 0)
    return [0]


def _nested_indirect(d: Driver) -> list[int]:
    table = d.alloc(16)
    mem = d.mem
    mem.write(table, DESC.pack(table, 16, VIRTQ_DESC_F_INDIRECT, 0))
    d.put_desc(0, table, 16, VIRTQ_DESC_F_INDIRECT)
    return [0]


def _indirect_loop(d: Driver) -> list[int]:
    table = d.alloc(32)
    d.mem.write(table, DESC.pack(d.alloc(16), 16, VIRTQ_DESC_F_NEXT, 1) + DESC.pack(d.alloc(16), 16, 1, 0))
    d.put_desc(0, table, 32, VIRTQ_DESC_F_INDIRECT)
    return [0]


HOSTILE = {"loop": _loop, "next_out_of_range": _bad_next, "head_out_of_range": _bad_head,
           "outside_ram": _outside_ram, "huge_len": _huge_len, "len_wraps_2_64": _len_wraps,
           "readable_after_writable": _readable_after_writable, "nested_indirect": _nested_indirect,
           "indirect_loop": _indirect_loop}


def assert_needs_reset_then_recovers(blk: VirtioBlk, d: Driver) -> None:
    assert d.status() & vpci.DEVICE_NEEDS_RESET and blk.error
    assert blk.test_irq.level and blk.isr & vpci.ISR_CONFIG
    # Refused until reset: a good request now is not served.
    before = d.used_idx()
    d.publish([d.request(VIRTIO_BLK_T_FLUSH)["head"]])
    d.kick()
    assert blk.work() is False and d.used_idx() == before
    # Reset and start again: service resumes.
    assert d.init_modern()
    assert not d.status() & vpci.DEVICE_NEEDS_RESET
    good = d.request(VIRTIO_BLK_T_GET_ID, 0, 20)
    d.submit([good])
    assert d.new_used() == [(good["head"], 21)] and d.status_of(good) == VIRTIO_BLK_S_OK


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_chain(blk, mem, case):
    d = Driver(blk, mem)
    d.init_modern()
    d.publish(HOSTILE[case](d))
    d.kick()
    d.run()  # no exception escapes, and it ends
    assert d.used_idx() == 0
    assert_needs_reset_then_recovers(blk, d)


def test_avail_idx_jump(blk, mem):
    d = Driver(blk, mem)
    d.init_modern()
    d.set_avail_idx(QSIZE + 1)
    d.kick()
    d.run()
    assert_needs_reset_then_recovers(blk, d)


@pytest.mark.parametrize("layout", ["size_not_power_of_two", "misaligned_desc", "used_outside_ram"])
def test_hostile_layout(blk, mem, layout):
    d = Driver(blk, mem)
    if layout == "size_not_power_of_two":
        d.init_modern(qsize=48)
    elif layout == "misaligned_desc":
        d.desc = DESC_GPA + 8
        d.init_modern()
    else:
        d.used = RAM_SIZE - 64  # the used ring of 64 entries would run past the end of RAM
        _init_without_clearing_rings(d)
    assert not blk.queues[0].ready
    d.used, d.desc, d.qsize = USED_GPA, DESC_GPA, QSIZE
    assert_needs_reset_then_recovers(blk, d)


def _init_without_clearing_rings(d: Driver) -> None:
    saved = d.clear_rings
    d.clear_rings = lambda: None
    try:
        d.init_modern()
    finally:
        d.clear_rings = saved


# -- crash restart --------------------------------------------------------------------------------
def _restart(mem, image_path, fds, snap: dict) -> VirtioBlk:
    packed = msgpack.packb(snap)
    assert len(packed) <= STATE_MODEL_BYTES
    new = VirtioBlk(mem, open_image(image_path, fds), Irq(), serial="splitvm-disk-0")
    new.restore(msgpack.unpackb(packed))
    return new


def _mixed(d: Driver, n: int) -> tuple[list[dict], bytearray]:
    """n requests: even ones write a sector, odd ones read one back."""
    reqs, writes = [], {}
    for i in range(n):
        if i % 2 == 0:
            data = bytes([i]) * 512
            writes[20 + i] = data
            reqs.append(d.request(VIRTIO_BLK_T_OUT, 20 + i, data))
        else:
            reqs.append(d.request(VIRTIO_BLK_T_IN, 20 + i - 1, 512))
    return reqs, writes


def _queued(blk: VirtioBlk, mem: GuestMemory, n: int) -> tuple[Driver, list[dict], dict]:
    """A driven device with n mixed requests made available and kicked, none served yet."""
    d = Driver(blk, mem)
    d.init_modern()
    reqs, writes = _mixed(d, n)
    d.publish([r["head"] for r in reqs])
    d.kick()
    return d, reqs, writes


def _check_exactly_once(d: Driver, reqs: list[dict], image_path, writes: dict) -> None:
    used = d.new_used()
    assert sorted(h for h, _ in used) == sorted(r["head"] for r in reqs), "every head exactly once"
    image = image_path.read_bytes()
    for sector, data in writes.items():
        assert image[sector * 512 : sector * 512 + 512] == data
    for i, r in enumerate(reqs):
        assert d.status_of(r) == VIRTIO_BLK_S_OK
        if i % 2:
            assert d.mem.read(r["buf"], 512) == writes[20 + i - 1]


def test_restart_with_heads_in_flight(blk, mem, image_path, fds):
    d, reqs, writes = _queued(blk, mem, 16)
    assert blk.work() is True
    snap = blk.snapshot()
    assert len(snap["queues"][0]["in_flight"]) == 16
    new = _restart(mem, image_path, fds, snap)  # the old process died here
    d.dev = new
    d.run()
    _check_exactly_once(d, reqs, image_path, writes)
    assert new.irq_level()


def test_restart_after_old_model_completed_everything(blk, mem, image_path, fds):
    d, reqs, writes = _queued(blk, mem, 16)
    assert blk.work() is True
    snap = blk.snapshot()
    blk.work()  # completes all 16; then "dies" before publishing
    new = _restart(mem, image_path, fds, snap)
    assert new.queues[0].in_flight == []
    d.dev = new
    d.run()
    _check_exactly_once(d, reqs, image_path, writes)
    assert new.irq_level()  # the completions are signalled even if the old process could not


@pytest.mark.parametrize("done_before_death", [1, 5, 15])
def test_restart_after_partial_completion(blk, mem, image_path, fds, done_before_death):
    d, reqs, writes = _queued(blk, mem, 16)
    assert blk.work() is True
    snap = blk.snapshot()
    blk.image = DyingImage(blk.image.fd, ios_left=done_before_death)
    with pytest.raises(Died):
        blk.work()
    assert d.used_idx() == done_before_death  # the dead process wrote these after the snapshot
    new = _restart(mem, image_path, fds, snap)
    assert len(new.queues[0].in_flight) == 16 - done_before_death
    d.dev = new
    d.run()
    _check_exactly_once(d, reqs, image_path, writes)


def test_restart_death_while_taking_heads(blk, mem, image_path, fds):
    """A death during the call that takes heads: they stay past last_avail_idx."""
    d, reqs, writes = _queued(blk, mem, 8)
    snap = blk.snapshot()  # published after the kick, before work()
    assert blk.work() is True  # took the heads; the process dies before publishing
    new = _restart(mem, image_path, fds, snap)
    d.dev = new
    d.run()
    _check_exactly_once(d, reqs, image_path, writes)


def test_restore_refuses_a_used_ring_too_far_ahead(blk, mem, image_path, fds):
    d = Driver(blk, mem)
    d.init_modern()
    d.publish([d.request(VIRTIO_BLK_T_FLUSH)["head"]])
    d.kick()
    blk.work()
    snap = blk.snapshot()
    mem.write(d.used + 2, (5).to_bytes(2, "little"))  # a guest scribbling on the used idx
    new = _restart(mem, image_path, fds, snap)
    assert new.status & vpci.DEVICE_NEEDS_RESET and new.work() is False


def test_used_no_notify_while_polling_then_kicks_reenabled(blk, mem):
    """2.7.10: while the device polls the ring it tells the driver not to kick; a request
    published then is served without one; when its polling window ends it allows kicks again."""
    now = [0]
    blk.clock = lambda: now[0]
    d = Driver(blk, mem)
    d.init_modern()
    d.publish([d.request(VIRTIO_BLK_T_FLUSH)["head"]])
    d.kick()
    assert blk.work() is True
    used_flags = lambda: int.from_bytes(mem.read(d.used, 2), "little")  # noqa: E731
    assert used_flags() & 1  # VIRTQ_USED_F_NO_NOTIFY
    assert blk.work() is True  # completed, and now polling
    assert len(d.new_used()) == 1
    now[0] += vpci.IDLE_POLL_NS // 2
    late = d.request(VIRTIO_BLK_T_FLUSH)
    d.publish([late["head"]])  # no kick: the flag said so
    for _ in range(4):
        blk.work()
    assert [h for h, _ in d.new_used()] == [late["head"]]
    assert blk.work() is True and used_flags() & 1  # still inside the window
    now[0] += 2 * vpci.IDLE_POLL_NS
    assert blk.work() is False  # once the window has passed, the device goes idle
    assert used_flags() & 1 == 0  # kicks are wanted again


# -- cache mode (VIRTIO_BLK_F_CONFIG_WCE) -------------------------------------------------------
def writeback_field(d: Driver) -> int:
    from backends.virtio.blk import WRITEBACK_OFF

    return d.rd(MODERN, vpci.DEVICE_OFF + WRITEBACK_OFF, 1)


def set_writeback(d: Driver, value: int) -> None:
    from backends.virtio.blk import WRITEBACK_OFF

    d.wr(MODERN, vpci.DEVICE_OFF + WRITEBACK_OFF, 1, value)


def test_config_wce_writethrough_flushes_every_write(mem, image_path, fds):
    """5.2.4/5.2.5: with VIRTIO_BLK_F_CONFIG_WCE the driver may set `writeback` to 0; each write
    then completes only once it is on stable storage (fdatasync before the used entry). A
    driver that did not negotiate the feature cannot change it; a reset restores it."""
    from backends.virtio.blk import VIRTIO_BLK_F_CONFIG_WCE

    fd = os.open(image_path, os.O_RDWR)
    fds.append(fd)
    img = CountingImage(fd)
    dev = VirtioBlk(mem, img, Irq())
    d = Driver(dev, mem)
    assert d.init_modern()
    assert d.offered & VIRTIO_BLK_F_CONFIG_WCE and d.offered & VIRTIO_BLK_F_FLUSH  # 5.2.5.1: FLUSH too
    assert writeback_field(d) == 1
    d.submit([d.request(VIRTIO_BLK_T_OUT, 4, b"\x11" * 512)])
    assert img.flushes == 0
    set_writeback(d, 0)
    assert writeback_field(d) == 0
    reqs = [d.request(VIRTIO_BLK_T_OUT, 8 + i, bytes([i]) * 512) for i in range(3)]
    d.submit(reqs)
    assert [d.status_of(r) for r in reqs] == [VIRTIO_BLK_S_OK] * 3 and img.flushes == 3
    assert image_path.read_bytes()[8 * 512 : 11 * 512] == b"\x00" * 512 + b"\x01" * 512 + b"\x02" * 512
    d.submit([d.request(VIRTIO_BLK_T_IN, 8, 512)])
    assert img.flushes == 3  # reads need none
    assert d.init_modern(features=d.offered & ~VIRTIO_BLK_F_CONFIG_WCE)  # a reset, then no CONFIG_WCE
    assert writeback_field(d) == 1
    set_writeback(d, 0)
    assert writeback_field(d) == 1


def test_writethrough_image_reports_writeback_0(mem, image_path, fds):
    fd = os.open(image_path, os.O_RDWR | os.O_DSYNC)
    fds.append(fd)
    img = CountingImage(fd, cache="writethrough")
    d = Driver(VirtioBlk(mem, img, Irq()), mem)
    assert d.init_modern()
    assert writeback_field(d) == 0
    d.submit([d.request(VIRTIO_BLK_T_OUT, 1, b"\x22" * 512)])
    assert img.flushes == 0  # O_DSYNC already made it durable
