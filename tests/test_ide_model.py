"""The PIIX3 IDE model in-process (sans-I/O): real raw images in tmp_path, real guest RAM
over a memfd, accesses made as a guest driver would make them."""

from __future__ import annotations

import hashlib
import os
import struct

import pytest
from test_block import CountingImage

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


# Word 93 (ATA8-ACS Table 21, 7.16.7.41): 14 shall be one, 13 CBLID- (80-conductor); device 0:
# bit 0 one, 2:1 = 11b (numbered by "some other method"), 3 passed diagnostics, 4/5 PDIAG-/DASP-
# seen from device 1, 12:8 clear; device 1: 7:0 clear, bit 8 one, 10:9 = 11b, 11 PDIAG- asserted.
W93_DEV0_ALONE, W93_DEV0_WITH_DEV1, W93_DEV1 = 0x600F, 0x603F, 0x6F00


def identify_words(g: Guest, dev: int, cmd: int = 0xEC) -> list[int]:
    g.outb(DEVICE, dev)
    g.outb(STATUS, cmd)
    assert g.inb(STATUS) & DRQ
    return words(g.insw(256))


def test_identify_word93_per_device(mem, disk, tmp_path, cd):
    img = make_image(tmp_path / "slave.img", 1 << 16)
    try:
        g = make(mem, [disk_spec(disk), disk_spec(img), disk_spec(disk), None])
        w0, w1 = identify_words(g, 0xE0)[93], identify_words(g, 0xF0)[93]
        assert (w0, w1) == (W93_DEV0_WITH_DEV1, W93_DEV1)
        assert w0 & 0x1F00 == 0 and w1 & 0x00FF == 0  # each clears the other's field
        assert w0 & (1 << 3)  # device 0 passed diagnostics (was 0)
        sec = on_secondary(g)
        assert identify_words(sec, 0xE0)[93] == W93_DEV0_ALONE  # no device 1: no DASP-/PDIAG-
        # A packet device reports word 93 too (7.17.6.38: bits 15:13 mandatory).
        g2 = make(mem, [None, None, disk_spec(disk), cd_spec(cd)])
        sec2 = on_secondary(g2)
        assert identify_words(sec2, 0xB0, 0xA1)[93] == W93_DEV1
        assert identify_words(sec2, 0xA0)[93] == W93_DEV0_WITH_DEV1
    finally:
        os.close(img.fd)


def test_nop_aborts_and_is_advertised(mem, disk, cd):
    g = make(mem, [disk_spec(disk), None, cd_spec(cd), None])
    w = identify_words(g, 0xE0)
    assert w[82] & (1 << 14) and w[85] & (1 << 14)  # NOP supported, in both words (85 was 0)
    assert w[82] & (1 << 3) and w[85] & (1 << 3)  # Power Management: CHECK POWER MODE, IDLE, STANDBY
    for sub in (0x00, 0x01, 0x5A):  # NOP, NOP Auto Poll, reserved: all abort (Table 26)
        g.command(0x00, lba=0x123456, count=0x42, feature=sub)
        assert g.irq14.level
        assert g.inb(STATUS) == DRDY | 0x10 | ERR and g.inb(ERROR) == 0x04
        # every field but Error and Status is kept (ATA8-ACS 7.20.5)
        assert [g.inb(p) for p in (NSECT, LBAL, LBAM, LBAH, DEVICE)] == [0x42, 0x56, 0x34, 0x12, 0xE0]
    sec = on_secondary(g)
    sec.command(0x00, lba=0x654321, count=0x24)  # mandatory for packet devices (7.20.1): aborts
    assert sec.inb(STATUS) & ERR and sec.inb(ERROR) == 0x04
    assert [sec.inb(p) for p in (NSECT, LBAL, LBAM, LBAH)] == [0x24, 0x21, 0x43, 0x65]


@pytest.mark.parametrize("count,ok", [
    (0x00, True), (0x01, False),  # PIO default; IORDY cannot be disabled (word 49 bit 10 = 0)
    (0x02, False), (0x03, False), (0x04, False), (0x07, False),  # 00000 010b-111b: undefined
    (0x08, True), (0x0C, True), (0x0D, False),  # PIO flow control modes 0-4, not 5
    (0x10, False), (0x12, False),  # single word DMA: retired
    (0x20, True), (0x22, True), (0x23, False),  # Multiword DMA 0-2
    (0x40, True), (0x45, True), (0x46, False),  # Ultra DMA 0-5
    (0x80, False), (0x18, False), (0xFF, False),  # reserved / undefined types
])
def test_set_features_transfer_mode_values(mem, disk, count, ok):
    # ATA8-ACS 7.47.5, Table 34: only defined (and advertised) Count values are taken.
    g = make(mem, [disk_spec(disk), None, None, None])
    g.command(0xEF, feature=0x03, count=0x22)  # start from Multiword DMA 2
    assert not g.inb(STATUS) & ERR
    g.command(0xEF, feature=0x03, count=count)
    if ok:
        assert g.inb(STATUS) == DRDY | 0x10
        return
    assert g.inb(STATUS) & ERR and g.inb(ERROR) == 0x04
    assert identify_words(g, 0xE0)[63] == 0x0407  # an aborted mode change keeps the old mode


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


def test_packet_device_refuses_ata_commands(mem, cd):
    g = on_secondary(cd_guest(mem, cd))
    # IDENTIFY DEVICE: abort and the Table 85 signature (ATA8-ACS 7.16.5 -> 7.11.4): Count 01h,
    # LBA 01h/14h/EBh.
    g.command(0xEC, lba=0x998877, count=0x55, dev=0xA3)
    assert g.irq15.level
    assert g.inb(STATUS) & ERR and g.inb(ERROR) == 0x04
    assert [g.inb(p) for p in (NSECT, LBAL, LBAM, LBAH)] == [0x01, 0x01, 0x14, 0xEB]
    # READ SECTOR(S): abort, signature in LBA (23:8) only (7.34.6); Count, LBA Low and Device
    # keep what the host wrote (they were rewritten to 01h/01h/A0h before).
    g.command(0x20, lba=0x998877, count=0x55, dev=0xE3)
    assert g.inb(STATUS) & ERR and g.inb(ERROR) == 0x04
    assert [g.inb(p) for p in (NSECT, LBAL, LBAM, LBAH, DEVICE)] == [0x55, 0x77, 0x14, 0xEB, 0xE3]
    # Prohibited commands (4.3.1) and READ SECTOR(S) EXT: a plain abort, no signature.
    for cmd in (0x24, 0x30, 0x34, 0xC4, 0xC5, 0xC6, 0xC8, 0xCA, 0x25, 0x35):
        g.command(cmd, lba=0x998877, count=0x55, dev=0xE3)
        assert g.inb(STATUS) & ERR and g.inb(ERROR) == 0x04, hex(cmd)
        assert [g.inb(p) for p in (NSECT, LBAL, LBAM, LBAH, DEVICE)] == [0x55, 0x77, 0x88, 0x99, 0xE3], hex(cmd)


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
    mem.write(DMA_BUF, b"\xAA" * 2048)
    write_prds(mem, [(DMA_BUF, 1024)])
    g.command(0xC8, lba=0, count=4)
    start_dma(g, True)
    g.run_work()
    # PIIX Interrupt/Active table: neither bit, no Error: the PRDs were shorter than the
    # transfer. The device still waits for the rest: DRQ held, no ERR, no completion interrupt.
    assert g.bm_in(2) & 0x07 == 0 and not g.irq14.level
    assert g.inb(STATUS) == DRDY | 0x10 | DRQ
    assert mem.read(DMA_BUF, 1024) == disk.read(0, 1024) and mem.read(DMA_BUF + 1024, 1024) == b"\xAA" * 1024
    assert not g.ide.work()  # nothing more moves
    g.command(0xEC)  # a command over DRQ is not taken
    assert g.inb(STATUS) == DRDY | 0x10 | DRQ and not g.irq14.level
    # The guest stops the bus master: the unfinished command ends with ABRT, no interrupt ...
    g.bm_out(0, 1, 0x08)
    assert g.inb(STATUS) == DRDY | 0x10 | ERR and g.inb(ERROR) == 0x04 and not g.irq14.level
    # ... and the next command works.
    write_prds(mem, [(DMA_BUF, 2048)])
    g.command(0xC8, lba=0, count=4)
    start_dma(g, True)
    g.run_work()
    assert g.bm_in(2) & 0x07 == 0x04 and g.inb(STATUS) == DRDY | 0x10
    assert mem.read(DMA_BUF, 2048) == disk.read(0, 2048)


def test_dma_short_prds_software_reset(mem, disk, cd):
    g = make(mem, [disk_spec(disk), None, cd_spec(cd), None])
    write_prds(mem, [(DMA_BUF, 512)])
    g.command(0xCA, lba=0, count=2)
    start_dma(g, False)
    g.run_work()
    assert g.inb(STATUS) & (DRQ | ERR) == DRQ and g.bm_in(2) & 0x07 == 0
    g.outb(CTRL, 0x04)  # SRST recovers the device left in its data phase
    g.outb(CTRL, 0x00)
    assert g.inb(STATUS) == DRDY | 0x10 and g.inb(ERROR) == 0x01
    # ATAPI DMA with a short table: the same (the PACKET command does not complete).
    sec = on_secondary(g)
    g.bm_out(0, 1, 0)
    g.bm_out(8 + 4, 4, PRD_TABLE)
    g.bm_out(8, 1, 0x09)
    sec.outb(DEVICE, 0xA0)
    packet(sec, bytes([0x28, 0, 0, 0, 0, 2, 0, 0, 2]), dma=True)  # 4 KiB into a 512-byte table
    g.run_work()
    assert g.bm_in(10) & 0x07 == 0 and not g.irq15.level
    assert sec.inb(STATUS) & (DRQ | ERR) == DRQ
    g.bm_out(8, 1, 0x08)  # stop: ABRT in the PACKET error form (I/O = C/D = 1)
    assert sec.inb(STATUS) & ERR and sec.inb(ERROR) & 0x04 and sec.inb(NSECT) == 0x03
    assert not g.irq15.level


def test_dma_prd_outside_ram(mem, disk):
    g = make(mem, [disk_spec(disk), None, None, None])
    before = disk.read(0, 4096)
    write_prds(mem, [(RAM - 512, 4096)])  # runs past the end of guest RAM
    g.command(0xCA, lba=0, count=8)
    start_dma(g, False)
    g.run_work()
    # PIIX error conditions: Error set, Active clear, no interrupt (was 0x06 with INTRQ). The
    # guest also sees the command failed in the drive registers.
    assert g.bm_in(2) & 0x07 == 0x02 and not g.irq14.level
    assert g.inb(STATUS) == DRDY | 0x10 | ERR and g.inb(ERROR) == 0x04
    assert disk.read(0, 4096) == before
    g.bm_out(4, 4, 0xFFFFFFF0)  # the table itself outside RAM
    g.bm_out(2, 1, 0x06)
    g.bm_out(0, 1, 0)
    g.command(0xC8, lba=0, count=1)  # the next command is taken without a reset
    start_dma(g, True)
    g.bm_out(4, 4, 0xFFFFFFF0)
    g.run_work()
    assert g.inb(STATUS) & ERR and g.bm_in(2) & 0x07 == 0x02 and not g.irq14.level
    # Recovery: stop, clear, and a good transfer.
    g.bm_out(0, 1, 0)
    g.bm_out(2, 1, 0x06)
    write_prds(mem, [(DMA_BUF, 512)])
    g.command(0xC8, lba=3, count=1)
    start_dma(g, True)
    g.run_work()
    assert g.bm_in(2) & 0x07 == 0x04 and g.irq14.level and g.inb(STATUS) == DRDY | 0x10
    assert mem.read(DMA_BUF, 512) == disk.read(3 * 512, 512)


def test_dma_prd_table_without_end(mem, disk):
    g = make(mem, [disk_spec(disk), None, None, None])
    mem.write(PRD_TABLE, struct.pack("<II", DMA_BUF, 2) * 600)  # 2-byte PRDs, no end bit
    g.command(0xC8, lba=0, count=4)
    start_dma(g, True)
    g.run_work()
    assert g.inb(STATUS) & ERR
    assert g.bm_in(2) & 0x07 == 0x02 and not g.irq14.level


def test_dma_image_error_is_a_device_error(mem, disk, monkeypatch):
    g = make(mem, [disk_spec(disk), None, None, None])

    def fail(*args):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(disk, "read_into", fail)
    write_prds(mem, [(DMA_BUF, 1024)])
    g.command(0xC8, lba=0, count=2)
    start_dma(g, True)
    g.run_work()
    # The drive fails the command itself: ABRT with its interrupt; no PCI error, so no Error.
    assert g.irq14.level and g.inb(STATUS) & ERR and g.inb(ERROR) == 0x04
    assert g.bm_in(2) & 0x07 == 0x04


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
    if bcl < 2:
        # 0: IDENTIFY PACKET DEVICE word 125 is 0, so command aborted (ATA8-ACS 7.17.6.44);
        # 1 with more than a byte to move: no valid byte count exists (7.22.6.2). Both in the
        # PACKET error form (Table 115: ABRT, I/O = C/D = 1) with an interrupt.
        assert g.irq15.level
        assert g.inb(STATUS) & (ERR | DRQ) == ERR and g.inb(ERROR) == 0x04 and g.inb(NSECT) == 0x03
        return
    limit = 0xFFFE if bcl == 0xFFFF else bcl
    out = b""
    guard = 0
    while g.inb(STATUS) & DRQ:
        n = g.inb(LBAM) | g.inb(LBAH) << 8
        assert 0 < n <= limit and n % 2 == 0  # 7.22.6.2: within the limit, even (not the tail)
        out += g.insw((n + 1) // 2)[:n]
        guard += 1
        assert guard < 20000
    assert out == cd.read(2048, 5 * 2048)
    # Over-reading the data port and huge allocation lengths stay inside the reply.
    packet(g, bytes([0x12, 0, 0, 0xFF, 0xFF]), bcl=bcl)
    assert len(read_reply(g)) == 36
    assert g.insw(4096) == b"\0" * 8192


def test_atapi_odd_byte_count_limits(mem, cd):
    g = on_secondary(cd_guest(mem, cd))
    g.outb(DEVICE, 0xA0)

    def sizes(cdb: bytes, bcl: int) -> tuple[list[int], bytes]:
        packet(g, cdb, bcl=bcl)
        ns, out = [], b""
        while g.inb(STATUS) & DRQ:
            ns.append(g.inb(LBAM) | g.inb(LBAH) << 8)
            out += g.insw((ns[-1] + 1) // 2)[: ns[-1]]
        assert g.inb(NSECT) == 0x03 and not g.inb(STATUS) & ERR
        return ns, out

    # A 5-byte INQUIRY reply with a limit of 3: even blocks at most the limit, the odd tail last.
    ns, out = sizes(bytes([0x12, 0, 0, 0, 5]), 3)
    assert ns == [2, 3] and out[0] == 5
    # A limit of 1 is fine when the whole transfer is 1 byte (7.22.5 c).
    assert sizes(bytes([0x12, 0, 0, 0, 1]), 1) == ([1], b"\x05")
    # An odd limit larger than a block still gives even blocks (limit - 1).
    ns, out = sizes(bytes([0x28, 0, 0, 0, 0, 4, 0, 0, 1]), 1001)
    assert set(ns[:-1]) == {1000} and sum(ns) == 2048 and out == cd.read(4 * 2048, 2048)


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


def test_atapi_reply_by_dma_when_the_packet_asks_for_dma(mem, cd):
    """PACKET with Features bit 0 (DMA): INQUIRY's reply comes through the bus master too,
    into the PRD buffer, with the PACKET completion (I/O and C/D set) and INTRQ."""
    g = on_secondary(cd_guest(mem, cd))
    g.outb(DEVICE, 0xA0)
    mem.write(DMA_BUF, b"\xee" * 96)
    write_prds(mem, [(DMA_BUF, 96)])
    g.ide.bar_access(4, 8 + 4, 4, True, PRD_TABLE.to_bytes(4, "little"))
    g.ide.bar_access(4, 8, 1, True, b"\x09")
    packet(g, bytes([0x12, 0, 0, 0, 36]), dma=True)
    assert not g.irq15.level  # no PIO data block offered: the bus master moves it
    g.run_work()
    inq = mem.read(DMA_BUF, 96)
    assert inq[0] == 5 and inq[8:16] == b"SPLITVM " and inq[36:] == b"\xee" * 60
    assert g.inb(NSECT) == 0x03 and g.irq15.level
    assert g.ide.bar_access(4, 10, 1, False, b"")[0] & 0x07 == 0x05  # PRDs longer: Active + Interrupt


@pytest.mark.parametrize("dma", [False, True])
def test_write_cache_disabled_means_each_write_is_flushed(mem, tmp_path, dma):
    """SET FEATURES 82h: the drive flushes at once and then completes a write only when it is
    on stable storage (ATA8-ACS 7.47.4); IDENTIFY word 85 bit 5 says which (7.16.7.35).
    02h turns the cache back on: writes complete without a flush."""
    plain = make_image(tmp_path / "d.img", 1 << 20)
    img = CountingImage(plain.fd)
    try:
        g = make(mem, [disk_spec(img), None, None, None])
        assert identify_words(g, 0xA0)[85] & (1 << 5)

        def write(lba: int) -> None:
            data = os.urandom(4 * 512)
            if dma:
                mem.write(DMA_BUF, data)
                write_prds(mem, [(DMA_BUF, len(data))])
                g.command(0xCA, lba=lba, count=4)
                start_dma(g, False)
                g.run_work()
                g.bm_out(0, 1, 0)
            else:
                g.command(0x30, lba=lba, count=4)
                for i in range(4):
                    g.outsw(data[i * 512 : (i + 1) * 512])
            assert g.inb(STATUS) == DRDY | 0x10
            assert img.read(lba * 512, len(data)) == data

        write(8)
        assert img.flushes == 0
        g.command(0xEF, feature=0x82)
        assert g.inb(STATUS) == DRDY | 0x10 and img.flushes == 1  # the cache flushed on the way off
        assert not identify_words(g, 0xA0)[85] & (1 << 5)
        write(16)
        write(24)
        assert img.flushes == 3
        g.command(0xEF, feature=0x02)
        write(32)
        assert img.flushes == 3 and identify_words(g, 0xA0)[85] & (1 << 5)
    finally:
        os.close(plain.fd)


def test_write_through_image_reports_no_write_cache(mem, tmp_path):
    """-drive cache=writethrough: every write is already on stable storage (O_DSYNC), so the
    drive says its write cache is off, as QEMU's does, and needs no flush per write."""
    path = tmp_path / "wt.img"
    path.write_bytes(bytes(1 << 20))
    img = CountingImage(os.open(path, os.O_RDWR | os.O_DSYNC), cache="writethrough")
    try:
        g = make(mem, [disk_spec(img), None, None, None])
        assert not identify_words(g, 0xA0)[85] & (1 << 5)
        g.command(0x30, lba=1, count=1)
        g.outsw(b"\x77" * 512)
        assert g.inb(STATUS) == DRDY | 0x10 and img.flushes == 0
        assert path.read_bytes()[512:1024] == b"\x77" * 512
    finally:
        os.close(img.fd)
