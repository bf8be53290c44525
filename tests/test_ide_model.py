"""The PIIX3 IDE model in-process (sans-I/O): real raw images in tmp_path, real guest RAM
over a memfd, accesses made as a guest driver would make them."""

from __future__ import annotations

import hashlib
import os
import struct

import pytest

from backends import atapi
from backends.block import BlockImage
from backends.ide import IdeDriveSpec, PiixIde
from vcpu.memory import GuestMemory, create_ram_fd

RAM = 4 << 20
BASE, CTRL = 0x1F0, 0x3F6
DATA, ERROR, NSECT, LBAL, LBAM, LBAH, DEVICE, STATUS = range(BASE, BASE + 8)
BSY, DRDY, DRQ, ERR = 0x80, 0x40, 0x08, 0x01
PRD_TABLE, DMA_BUF = 0x10000, 0x100000


class Irq:
    def __init__(self) -> None:
        self.level = False
        self.changes = 0

    def __call__(self, level: bool) -> None:
        assert level != self.level, "callbacks only on level changes"
        self.level = level
        self.changes += 1


@pytest.fixture
def mem():
    m = GuestMemory(create_ram_fd(RAM), RAM)
    yield m
    fd = m.fd
    m.close()
    os.close(fd)


def make_image(path, size: int, random: bool = True, readonly: bool = False, sector_size: int = 512) -> BlockImage:
    with open(path, "wb") as f:
        if random:
            f.write(os.urandom(size))
        else:
            f.truncate(size)
    fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
    return BlockImage(fd, readonly=readonly, sector_size=sector_size)


@pytest.fixture
def disk(tmp_path):
    img = make_image(tmp_path / "disk.img", 1 << 20)  # 2048 sectors
    yield img
    os.close(img.fd)


@pytest.fixture
def cd(tmp_path):
    img = make_image(tmp_path / "cd.iso", 64 * 2048, readonly=True)
    yield img
    os.close(img.fd)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class Guest:
    """The accesses a driver makes, on one model."""

    def __init__(self, ide: PiixIde, irq14: Irq, irq15: Irq) -> None:
        self.ide, self.irq14, self.irq15 = ide, irq14, irq15

    def outb(self, port: int, value: int) -> None:
        self.ide.pio(port, 1, True, bytes([value]), 1)

    def inb(self, port: int) -> int:
        return self.ide.pio(port, 1, False, b"", 1)[0]

    def insw(self, count: int) -> bytes:
        return self.ide.pio(DATA, 2, False, b"", count)

    def outsw(self, data: bytes) -> None:
        self.ide.pio(DATA, 2, True, data, len(data) // 2)

    def command(self, cmd: int, lba: int = 0, count: int = 1, dev: int = 0xE0, feature: int = 0) -> None:
        self.outb(DEVICE, dev | ((lba >> 24) & 0x0F))
        self.outb(ERROR, feature)
        self.outb(NSECT, count & 0xFF)
        self.outb(LBAL, lba & 0xFF)
        self.outb(LBAM, (lba >> 8) & 0xFF)
        self.outb(LBAH, (lba >> 16) & 0xFF)
        self.outb(STATUS, cmd)

    def command48(self, cmd: int, lba: int, count: int) -> None:
        self.outb(DEVICE, 0x40)
        for shift in (8, 0):  # "previous" bytes first, then the current ones
            self.outb(NSECT, (count >> shift) & 0xFF)
            self.outb(LBAL, (lba >> (24 if shift else 0)) & 0xFF)
            self.outb(LBAM, (lba >> (32 if shift else 8)) & 0xFF)
            self.outb(LBAH, (lba >> (40 if shift else 16)) & 0xFF)
        self.outb(STATUS, cmd)

    def bm_out(self, off: int, size: int, value: int) -> None:
        self.ide.bar_access(4, off, size, True, value.to_bytes(size, "little"))

    def bm_in(self, off: int, size: int = 1) -> int:
        return int.from_bytes(self.ide.bar_access(4, off, size, False, b""), "little")

    def run_work(self) -> int:
        calls = 0
        while self.ide.work():
            calls += 1
            assert calls < 10_000
        return calls + 1


def make(mem, drives) -> Guest:
    irq14, irq15 = Irq(), Irq()
    return Guest(PiixIde(mem, drives, irq14, irq15), irq14, irq15)


def disk_spec(img: BlockImage) -> IdeDriveSpec:
    return IdeDriveSpec(img, "disk", serial="SN123", model="splitvm test disk")


def cd_spec(img: BlockImage) -> IdeDriveSpec:
    return IdeDriveSpec(img, "cdrom", serial="CD1", model="splitvm cdrom")


def words(data: bytes) -> list[int]:
    return list(struct.unpack("<256H", data))


def ata_string(ws: list[int]) -> str:
    return b"".join(w.to_bytes(2, "big") for w in ws).decode().strip()


# -- PCI ----------------------------------------------------------------------------------
def test_pci_identity(mem, disk):
    g = make(mem, [disk_spec(disk), None, None, None])
    assert g.ide.config(0, 4, False, 0) == 0x70108086
    assert g.ide.config(8, 4, False, 0) >> 8 == 0x010180
    g.ide.config(0x20, 4, True, 0xFFFFFFFF)
    assert g.ide.config(0x20, 4, False, 0) == 0xFFFFFFF1  # 16 bytes of I/O
    g.ide.config(0x40, 2, True, 0x8000)
    assert g.ide.config(0x40, 2, False, 0) == 0x8000


# -- IDENTIFY, PIO ------------------------------------------------------------------------
def test_identify(mem, disk):
    g = make(mem, [disk_spec(disk), None, None, None])
    g.command(0xEC)
    assert g.irq14.level
    assert g.inb(STATUS) & (DRQ | DRDY) == DRQ | DRDY
    assert not g.irq14.level  # the status read acknowledged it
    w = words(g.insw(256))
    assert ata_string(w[27:47]) == "splitvm test disk"
    assert ata_string(w[10:20]) == "SN123"
    assert w[60] | (w[61] << 16) == 2048
    assert w[100] | (w[101] << 16) | (w[102] << 32) | (w[103] << 48) == 2048
    assert w[83] & (1 << 10) and w[86] & (1 << 10)  # LBA48
    assert w[47] & 0xFF == 16
    assert w[63] & 0x07 == 0x07 and w[88] & 0x3F == 0x3F
    assert g.inb(STATUS) == DRDY | 0x10  # done, no DRQ


def test_pio_read_several_sectors(mem, disk):
    g = make(mem, [disk_spec(disk), None, None, None])
    g.command(0x20, lba=100, count=5)
    got = b""
    for _ in range(5):
        assert g.irq14.level  # an interrupt for each DRQ block
        assert g.inb(STATUS) & DRQ
        got += g.insw(256)
    assert not g.inb(STATUS) & DRQ
    assert not g.irq14.level  # none after the last block of a read
    assert sha(got) == sha(disk.read(100 * 512, 5 * 512))


def test_pio_read_one_rep_across_blocks(mem, disk):
    g = make(mem, [disk_spec(disk), None, None, None])
    g.command(0x20, lba=7, count=4)
    assert g.insw(1024) == disk.read(7 * 512, 2048)


def test_pio_write(mem, disk):
    g = make(mem, [disk_spec(disk), None, None, None])
    data = os.urandom(3 * 512)
    g.command(0x30, lba=33, count=3)
    assert g.inb(STATUS) & DRQ and not g.irq14.level  # 9.6: no interrupt before the first block
    for i in range(3):
        g.outsw(data[i * 512 : (i + 1) * 512])
        assert g.irq14.level
        g.inb(STATUS)
    assert g.inb(STATUS) == DRDY | 0x10
    assert sha(disk.read(33 * 512, 3 * 512)) == sha(data)


def test_read_write_multiple(mem, disk):
    g = make(mem, [disk_spec(disk), None, None, None])
    g.command(0xC6, count=4)  # SET MULTIPLE MODE 4
    assert not g.inb(STATUS) & ERR
    g.command(0xC6, count=3)
    assert g.inb(STATUS) & ERR and g.inb(ERROR) == 0x04
    data = os.urandom(10 * 512)
    g.command(0xC5, lba=200, count=10)
    irqs = 0
    for i in range(0, 10, 4):
        n = min(4, 10 - i)
        assert g.inb(STATUS) & DRQ
        g.outsw(data[i * 512 : (i + n) * 512])
        irqs += g.irq14.level
        g.inb(STATUS)
    assert irqs == 3
    assert disk.read(200 * 512, 10 * 512) == data
    g.command(0xC4, lba=200, count=10)
    blocks = []
    while g.inb(STATUS) & DRQ:
        blocks.append(g.insw(4 * 256 if len(blocks) < 2 else 2 * 256))
    assert b"".join(blocks) == data and len(blocks) == 3


def test_lba48_beyond_28_bits(mem, tmp_path):
    img = make_image(tmp_path / "big.img", (129 << 30), random=False)  # sparse, > 128 GiB
    try:
        lba = (1 << 28) + 12345
        payload = os.urandom(1024)
        img.write(lba * 512, payload)
        g = make(mem, [disk_spec(img), None, None, None])
        g.command(0xEC)
        w = words(g.insw(256))
        assert w[60] | (w[61] << 16) == 0x0FFFFFFF
        assert sum(w[100 + i] << (16 * i) for i in range(4)) == (129 << 30) // 512
        g.command48(0x24, lba, 2)
        assert g.insw(512) == payload
        g.command(0x20, lba=lba, count=1)  # 28-bit: wraps to a different sector, fine
        g.insw(256)
        g.command48(0x24, (129 << 30) // 512 - 1, 2)  # one sector past the end
        assert g.inb(STATUS) & ERR and g.inb(ERROR) == 0x10  # IDNF
        g.command48(0x27, 0, 0)
        g.outb(CTRL, 0x80)  # HOB: read the previous bytes
        hi = g.inb(LBAL) | g.inb(LBAM) << 8 | g.inb(LBAH) << 16
        g.outb(CTRL, 0)
        lo = g.inb(LBAL) | g.inb(LBAM) << 8 | g.inb(LBAH) << 16
        assert (hi << 24 | lo) == (129 << 30) // 512 - 1
    finally:
        os.close(img.fd)


def test_out_of_range_and_unknown(mem, disk):
    g = make(mem, [disk_spec(disk), None, None, None])
    g.command(0x20, lba=2047, count=2)
    assert g.inb(STATUS) & ERR and g.inb(ERROR) == 0x10
    g.command(0x55)
    assert g.inb(STATUS) & ERR and g.inb(ERROR) == 0x04
    g.command(0xEF, feature=0x03, count=0x45)  # UDMA 5: advertised
    assert not g.inb(STATUS) & ERR
    g.command(0xEF, feature=0x03, count=0x46)  # UDMA 6: not
    assert g.inb(STATUS) & ERR
    for cmd in (0xE7, 0xEA, 0x91, 0xE0, 0xE1):
        g.command(cmd)
        assert g.inb(STATUS) == DRDY | 0x10
    g.command(0xE5)
    assert g.inb(NSECT) == 0xFF


def test_readonly_write_aborts(mem, tmp_path):
    img = make_image(tmp_path / "ro.img", 1 << 16, readonly=True)
    try:
        g = make(mem, [disk_spec(img), None, None, None])
        g.command(0x30, lba=0, count=1)
        assert g.inb(STATUS) & ERR and g.inb(ERROR) == 0x04
    finally:
        os.close(img.fd)


def test_read_native_max_empty_and_cd(mem, tmp_path, cd):
    empty = make_image(tmp_path / "empty.img", 0, random=False)
    try:
        g = make(mem, [disk_spec(empty), cd_spec(cd), None, None])
        g.command(0xF8)
        assert g.inb(STATUS) == DRDY | 0x10 and g.inb(LBAL) == 0
        g.command(0x27, dev=0x40)
        assert not g.inb(STATUS) & ERR
        g.command(0xF8, dev=0xF0)  # to the CD: aborted, no division anywhere
        assert g.inb(STATUS) & ERR
        g.command(0x20, dev=0xE0, count=1)  # read of an empty disk: IDNF
        assert g.inb(ERROR) == 0x10
    finally:
        os.close(empty.fd)


# -- reset, interrupts, absent drives -----------------------------------------------------
def test_software_reset_signature(mem, disk, cd):
    g = make(mem, [disk_spec(disk), cd_spec(cd), None, None])
    g.command(0x20, lba=0, count=2)  # leave a transfer half done
    g.outb(CTRL, 0x04)
    assert g.inb(CTRL) & BSY
    g.outb(CTRL, 0x00)
    assert not g.irq14.level
    assert [g.inb(p) for p in (ERROR, NSECT, LBAL, LBAM, LBAH)] == [1, 1, 1, 0, 0]
    assert g.inb(STATUS) == DRDY | 0x10
    g.outb(DEVICE, 0xB0)
    assert [g.inb(p) for p in (NSECT, LBAL, LBAM, LBAH)] == [1, 1, 0x14, 0xEB]
    assert g.inb(STATUS) == 0
    g.command(0xEC, dev=0xB0)  # ATA IDENTIFY to the CD: abort, signature kept
    assert g.inb(STATUS) & ERR and (g.inb(LBAM), g.inb(LBAH)) == (0x14, 0xEB)


def test_status_read_clears_irq_and_nien_masks(mem, disk):
    g = make(mem, [None, None, disk_spec(disk), None])
    sec = 0x170
    g.ide.pio(sec + 6, 1, True, b"\xe0", 1)
    g.ide.pio(sec + 7, 1, True, b"\xe7", 1)
    assert g.irq15.level and not g.irq14.level
    assert g.ide.irq_levels() == (False, True)
    g.ide.pio(0x376, 1, False, b"", 1)  # alternate status: no side effect
    assert g.irq15.level
    g.ide.pio(sec + 7, 1, False, b"", 1)
    assert not g.irq15.level
    g.ide.pio(0x376, 1, True, b"\x02", 1)  # nIEN
    g.ide.pio(sec + 7, 1, True, b"\xe7", 1)
    assert not g.irq15.level
    g.ide.pio(0x376, 1, True, b"\x00", 1)
    assert g.irq15.level  # still pending: delivered once unmasked
    assert g.irq15.changes == 3


def test_absent_drives(mem, disk):
    g = make(mem, [disk_spec(disk), None, None, None])
    g.outb(DEVICE, 0xF0)  # absent slave
    assert g.inb(STATUS) == 0
    g.outb(STATUS, 0xEC)  # ignored
    assert g.inb(STATUS) == 0 and not g.irq14.level
    assert g.ide.pio(0x177, 1, False, b"", 1) == b"\x00"  # empty channel
    g.bm_out(0, 1, 1)  # start and cancel DMA with the absent slave selected
    g.bm_out(0, 1, 0)
    assert not g.ide.work()
    g.outb(DEVICE, 0xE0)
    assert g.inb(STATUS) == DRDY | 0x10


def test_taskfile_ignored_while_drq_and_wide_access(mem, disk):
    g = make(mem, [disk_spec(disk), None, None, None])
    g.command(0x20, lba=5, count=1)
    g.outb(LBAL, 0x99)
    assert g.inb(LBAL) == 5
    g.insw(256)
    g.ide.pio(NSECT, 2, True, b"\x07\x08", 1)  # a 16-bit write splits into two ports
    assert (g.inb(NSECT), g.inb(LBAL)) == (7, 8)
    assert g.ide.pio(DATA, 4, False, b"", 1) == b"\0" * 4  # no DRQ: zeros


# -- bus-master DMA -----------------------------------------------------------------------
def write_prds(mem, entries):
    table = b""
    for i, (addr, size) in enumerate(entries):
        table += struct.pack("<II", addr, (size & 0xFFFF) | (0x80000000 if i == len(entries) - 1 else 0))
    mem.write(PRD_TABLE, table)


def start_dma(g: Guest, to_memory: bool) -> None:
    g.bm_out(4, 4, PRD_TABLE)
    g.bm_out(0, 1, (0x08 if to_memory else 0) | 0x01)


def test_dma_read(mem, disk):
    g = make(mem, [disk_spec(disk), None, None, None])
    write_prds(mem, [(DMA_BUF, 4096), (DMA_BUF + 0x3000, 0)])  # 0 means 64 KiB
    nsect = (4096 + 65536) // 512
    g.command(0xC8, lba=10, count=nsect)
    assert g.ide.work() is False  # not started yet: nothing to do
    start_dma(g, True)
    assert g.inb(CTRL) & DRQ  # armed; work() moves the data
    g.run_work()
    assert g.irq14.level
    assert g.bm_in(2) & 0x07 == 0x04  # exact: interrupt, not active
    assert g.inb(STATUS) == DRDY | 0x10
    want = disk.read(10 * 512, nsect * 512)
    assert mem.read(DMA_BUF, 4096) == want[:4096]
    assert mem.read(DMA_BUF + 0x3000, 65536) == want[4096:]
    g.bm_out(2, 1, 0x04)  # W1C
    assert g.bm_in(2) & 0x04 == 0


def test_dma_write_start_first_and_longer_prds(mem, disk):
    g = make(mem, [disk_spec(disk), None, None, None])
    data = os.urandom(8 * 512)
    mem.write(DMA_BUF, data)
    write_prds(mem, [(DMA_BUF, 16384)])  # longer than the transfer
    start_dma(g, False)  # the start bit first, then the command
    g.command(0xCA, lba=300, count=8)
    g.run_work()
    assert g.bm_in(2) & 0x07 == 0x05  # longer: active and interrupt
    g.bm_out(0, 1, 0)
    assert g.bm_in(2) & 0x01 == 0
    assert disk.read(300 * 512, len(data)) == data


def test_dma_short_prds(mem, disk):
    g = make(mem, [disk_spec(disk), None, None, None])
    write_prds(mem, [(DMA_BUF, 1024)])
    g.command(0xC8, lba=0, count=4)
    start_dma(g, True)
    g.run_work()
    assert g.bm_in(2) & 0x07 == 0 and not g.irq14.level  # neither active nor interrupt


def test_dma_prd_outside_ram(mem, disk):
    g = make(mem, [disk_spec(disk), None, None, None])
    before = disk.read(0, 4096)
    write_prds(mem, [(RAM - 512, 4096)])  # runs past the end of guest RAM
    g.command(0xCA, lba=0, count=8)
    start_dma(g, False)
    g.run_work()
    assert g.inb(STATUS) & ERR and g.inb(ERROR) == 0x04
    assert g.bm_in(2) & 0x07 == 0x06  # error and interrupt, not active
    assert disk.read(0, 4096) == before
    g.bm_out(4, 4, 0xFFFFFFF0)  # the table itself outside RAM
    g.bm_out(2, 1, 0x06)
    g.bm_out(0, 1, 0)
    g.command(0xC8, lba=0, count=1)
    start_dma(g, True)
    g.bm_out(4, 4, 0xFFFFFFF0)
    g.run_work()
    assert g.inb(STATUS) & ERR and g.bm_in(2) & 0x02


def test_dma_prd_table_without_end(mem, disk):
    g = make(mem, [disk_spec(disk), None, None, None])
    mem.write(PRD_TABLE, struct.pack("<II", DMA_BUF, 2) * 600)  # 2-byte PRDs, no end bit
    g.command(0xC8, lba=0, count=4)
    start_dma(g, True)
    g.run_work()
    assert g.inb(STATUS) & ERR
    assert g.bm_in(2) & 0x07 == 0x06


def test_dma_bounded_work_and_snapshot_resume(mem, disk, tmp_path):
    g = make(mem, [disk_spec(disk), None, None, None])
    nsect = 1024  # 4 chunks of 256 sectors
    write_prds(mem, [(DMA_BUF + i * 0x10000, 0) for i in range(8)])
    g.command(0x25, lba=0, count=0)  # READ DMA EXT, count set below
    g.outb(CTRL, 0x04)
    g.outb(CTRL, 0)  # reset: start over cleanly
    g.command48(0x25, 512, nsect)
    start_dma(g, True)
    assert g.ide.work() is True  # one chunk done, more remains
    snap = g.ide.snapshot()
    import msgpack

    snap = msgpack.unpackb(msgpack.packb(snap))
    g2 = make(mem, [disk_spec(disk), None, None, None])
    g2.ide.restore(snap)
    assert g2.run_work() == 3
    assert g2.irq14.level and g2.ide.irq_levels() == (True, False)
    assert mem.read(DMA_BUF, nsect * 512) == disk.read(512 * 512, nsect * 512)
    assert g2.bm_in(2) & 0x07 == 0x04


# -- snapshot mid-PIO ---------------------------------------------------------------------
def test_snapshot_mid_pio_read(mem, disk):
    import msgpack

    g = make(mem, [disk_spec(disk), None, None, None])
    g.command(0xC6, count=8)
    g.command(0xC4, lba=40, count=20)
    first = g.insw(300)  # part of the first 8-sector block
    snap = msgpack.unpackb(msgpack.packb(g.ide.snapshot()))
    assert len(msgpack.packb(snap)) < 65536
    g2 = make(mem, [disk_spec(disk), None, None, None])
    g2.ide.restore(snap)
    g2.irq14.level = g2.ide.irq_levels()[0]  # the host re-drives the line it published
    rest = b""
    while g2.inb(STATUS) & DRQ:
        rest += g2.insw(min(256, (20 * 512 - len(first) - len(rest)) // 2))
    assert first + rest == disk.read(40 * 512, 20 * 512)


# -- ATAPI --------------------------------------------------------------------------------
def packet(g: Guest, cdb: bytes, bcl: int = 0xFFFE, dma: bool = False) -> None:
    g.outb(ERROR, 1 if dma else 0)
    g.outb(LBAM, bcl & 0xFF)
    g.outb(LBAH, bcl >> 8)
    g.outb(STATUS, 0xA0)
    assert g.inb(STATUS) & DRQ and g.inb(NSECT) == 0x01  # CoD: send the packet
    g.outsw(cdb.ljust(12, b"\0"))


def read_reply(g: Guest) -> bytes:
    out = b""
    while g.inb(STATUS) & DRQ:
        assert g.inb(NSECT) == 0x02  # data to the host
        n = g.inb(LBAM) | g.inb(LBAH) << 8
        out += g.insw((n + 1) // 2)[:n]
    assert g.inb(NSECT) == 0x03
    return out


def cd_guest(mem, cd) -> Guest:
    g = make(mem, [None, None, cd_spec(cd), None])
    return g


def on_secondary(g: Guest) -> Guest:
    """The same helpers, pointed at the secondary channel."""
    class Sec(Guest):
        def outb(self, port: int, value: int) -> None:
            self.ide.pio(port - 0x80 if port < 0x200 else 0x376, 1, True, bytes([value]), 1)

        def inb(self, port: int) -> int:
            return self.ide.pio(port - 0x80 if port < 0x200 else 0x376, 1, False, b"", 1)[0]

        def insw(self, count: int) -> bytes:
            return self.ide.pio(0x170, 2, False, b"", count)

        def outsw(self, data: bytes) -> None:
            self.ide.pio(0x170, 2, True, data, len(data) // 2)

    return Sec(g.ide, g.irq14, g.irq15)


def test_atapi_identify_inquiry_capacity_read(mem, cd):
    g = on_secondary(cd_guest(mem, cd))
    g.outb(DEVICE, 0xA0)
    g.outb(STATUS, 0xA1)
    w = words(g.insw(256))
    assert w[0] >> 14 == 2 and (w[0] >> 8) & 0x1F == 5
    assert ata_string(w[27:47]) == "splitvm cdrom"
    packet(g, bytes([0x00]))  # TEST UNIT READY
    assert g.irq15.level
    assert read_reply(g) == b""
    packet(g, bytes([0x12, 0, 0, 0, 36]))
    inq = read_reply(g)
    assert inq[0] == 5 and inq[8:16] == b"SPLITVM "
    packet(g, bytes([0x25]))
    assert read_reply(g) == struct.pack(">II", 63, 2048)
    packet(g, bytes([0x28, 0, 0, 0, 0, 3, 0, 0, 5]))  # READ(10) LBA 3, 5 blocks
    assert read_reply(g) == cd.read(3 * 2048, 5 * 2048)
    packet(g, bytes([0x5A, 0, 0x2A, 0, 0, 0, 0, 0, 64]))
    assert read_reply(g)[8] == 0x2A
    packet(g, bytes([0xFF]))  # unknown: CHECK CONDITION, ILLEGAL REQUEST
    assert g.inb(STATUS) & ERR and g.inb(ERROR) >> 4 == atapi.ILLEGAL_REQUEST
    packet(g, bytes([0x03, 0, 0, 0, 18]))
    sense = read_reply(g)
    assert sense[2] == atapi.ILLEGAL_REQUEST and sense[12] == atapi.ASC_INVALID_OPCODE
    packet(g, bytes([0x28, 0, 0, 0, 0, 63, 0, 0, 2]))  # past the end
    assert g.inb(ERROR) >> 4 == atapi.ILLEGAL_REQUEST
    g.outb(STATUS, 0x30)  # ATA write to a CD: abort
    assert g.inb(STATUS) & ERR


@pytest.mark.parametrize("bcl", [0, 1, 2, 3, 511, 0xFFFF])
def test_atapi_hostile_byte_counts(mem, cd, bcl):
    g = on_secondary(cd_guest(mem, cd))
    g.outb(DEVICE, 0xA0)
    packet(g, bytes([0x28, 0, 0, 0, 0, 1, 0, 0, 5]), bcl=bcl)
    if bcl == 0:
        assert g.inb(STATUS) & ERR  # a data command with no byte count aborts
        return
    out = b""
    guard = 0
    while g.inb(STATUS) & DRQ:
        n = g.inb(LBAM) | g.inb(LBAH) << 8
        assert 0 < n <= max(bcl, 2) and n <= 0xFFFE
        out += g.insw((n + 1) // 2)[:n]
        guard += 1
        assert guard < 20000
    assert out == cd.read(2048, 5 * 2048)
    # Over-reading the data port and huge allocation lengths stay inside the reply.
    packet(g, bytes([0x12, 0, 0, 0xFF, 0xFF]), bcl=bcl or 2)
    assert len(read_reply(g)) == 36 or bcl < 36
    assert g.insw(4096) == b"\0" * 8192


def test_atapi_dma_read(mem, cd):
    g = on_secondary(cd_guest(mem, cd))
    g.outb(DEVICE, 0xA0)
    write_prds(mem, [(DMA_BUF, 4 * 2048)])
    g.ide.bar_access(4, 8 + 4, 4, True, PRD_TABLE.to_bytes(4, "little"))
    g.ide.bar_access(4, 8, 1, True, b"\x09")
    packet(g, bytes([0x28, 0, 0, 0, 0, 10, 0, 0, 4]), dma=True)
    g.run_work()
    assert mem.read(DMA_BUF, 4 * 2048) == cd.read(10 * 2048, 4 * 2048)
    assert g.inb(NSECT) == 0x03 and g.irq15.level
    assert g.ide.bar_access(4, 10, 1, False, b"")[0] & 0x07 == 0x04
