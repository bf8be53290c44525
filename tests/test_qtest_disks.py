"""ide0 and blk0 driven by a qtest script with no guest: the real backend processes, a
script issuing the port, MMIO and RAM accesses, and hostile DMA tables and rings."""

import os
import struct
import subprocess

import pytest
from vmutil import ROOT, backend_row, env, splitvm_cmd

from vcpu.qtest import QtestClient

CF8, CFC = 0xCF8, 0xCFC
SLOT1 = 0x80000800  # bus 0, device 1, function 0: the first PCI device after the host bridge


@pytest.fixture
def qtest(tmp_path, run_dir):
    procs = []

    def start(*args):
        sock = str(tmp_path / f"qtest{len(procs)}.sock")
        client = QtestClient(sock)
        proc = subprocess.Popen(splitvm_cmd("-accel", "qtest", "-qtest", f"unix:{sock}", "-run-dir", str(run_dir),
                                            *args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=ROOT, env=env())
        client.accept()
        procs.append((client, proc))
        return client

    yield start
    for client, proc in procs:
        try:
            client.cmd("exit 0")
        except (RuntimeError, OSError):
            pass
        client.close()
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def cfg_write(q, reg, value):
    q.outl(CF8, SLOT1 | reg)
    q.outl(CFC, value)


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "d.img"
    p.write_bytes(os.urandom(1 << 20))
    return p


def ata_select_lba(q, lba, count):
    q.outb(0x1F6, 0xE0 | ((lba >> 24) & 0xF))
    q.outb(0x1F2, count)
    q.outb(0x1F3, lba & 0xFF)
    q.outb(0x1F4, (lba >> 8) & 0xFF)
    q.outb(0x1F5, (lba >> 16) & 0xFF)


def test_ata_pio_read_and_unknown_command(qtest, image, run_dir):
    q = qtest("-hda", str(image))
    ata_select_lba(q, 3, 1)
    q.outb(0x1F7, 0x20)  # READ SECTORS
    assert q.inb(0x1F7) & 0x08  # DRQ
    words = [int(q.cmd("inw 0x1f0"), 16) for _ in range(256)]
    assert b"".join(w.to_bytes(2, "little") for w in words) == image.read_bytes()[3 * 512 : 4 * 512]
    assert q.inb(0x1F7) & 0x89 == 0  # not BSY, no DRQ, no ERR
    q.outb(0x1F7, 0x77)  # no such command
    assert q.inb(0x1F7) & 0x01 and q.inb(0x1F1) & 0x04  # ERR with ABRT
    assert backend_row(run_dir, "ide0")["restarts"] == 0


def test_busmaster_dma_and_hostile_prd_tables(qtest, image, run_dir):
    q = qtest("-hda", str(image), "-m", "64M")
    cfg_write(q, 0x20, 0xC000)  # BAR4: the bus-master block
    cfg_write(q, 0x04, 0x0005)  # I/O decode and bus master
    prd, buf = 0x10000, 0x20000
    q.write(prd, struct.pack("<II", buf, 0x80000000 | 1024))
    ata_select_lba(q, 8, 2)
    q.outl(0xC004, prd)
    q.outb(0xC002, 0x06)  # clear error and interrupt (write 1 to clear)
    q.outb(0x1F7, 0xC8)  # READ DMA
    q.outb(0xC000, 0x09)  # start, device -> memory
    assert int(q.cmd("wait_irq 2000000"), 16) & (1 << 14)
    assert q.inb(0xC002) & 0x07 == 0x04  # interrupt, not active, no error
    assert q.read(buf, 1024) == image.read_bytes()[8 * 512 : 10 * 512]
    q.outb(0xC000, 0x00)
    assert q.inb(0x1F7) & 0x01 == 0

    # A PRD pointing outside guest RAM: the command fails, no host memory is touched.
    q.write(prd, struct.pack("<II", 0xF0000000, 0x80000000 | 512))
    q.outb(0xC002, 0x06)
    ata_select_lba(q, 0, 1)
    q.outb(0x1F7, 0xC8)
    q.outb(0xC000, 0x09)
    q.cmd("wait_irq 2000000")
    assert q.inb(0xC002) & 0x02  # bus-master error
    assert q.inb(0x1F7) & 0x01  # ATA ERR
    q.outb(0xC000, 0x00)

    # A table with no end-of-table bit within its page (512 PRDs of 2 bytes for a
    # 2 KiB transfer): error, never a walk past the page.
    q.write(prd, b"".join(struct.pack("<II", buf, 2) for _ in range(512)))
    q.outb(0xC002, 0x06)
    ata_select_lba(q, 0, 4)
    q.outb(0x1F7, 0xC8)
    q.outb(0xC000, 0x09)
    q.cmd("wait_irq 2000000")
    assert q.inb(0xC002) & 0x02
    q.outb(0xC000, 0x00)
    row = backend_row(run_dir, "ide0")
    assert row["state"] == "running" and row["restarts"] == 0


HOSTILE_CHAINS = {
    # descriptor 0 -> 1 -> 0: a loop
    "loop": struct.pack("<QIHH", 0x200000, 16, 1, 1) + struct.pack("<QIHH", 0x200100, 16, 1, 0),
    # a buffer far outside the 64 MiB of guest RAM
    "outside-ram": struct.pack("<QIHH", 0xF0000000, 16, 1, 1) + struct.pack("<QIHH", 0x200100, 1, 2, 0),
    # a 4 GiB length
    "huge-length": struct.pack("<QIHH", 0x200000, 16, 1, 1) + struct.pack("<QIHH", 0x200100, 0xFFFFFFFF, 2, 0),
    # address + length wrapping past 2^64
    "wraps": struct.pack("<QIHH", 0xFFFFFFFFFFFFF000, 0x2000, 1, 1) + struct.pack("<QIHH", 0x200100, 1, 2, 0),
    # next index beyond the queue size
    "next-out-of-range": struct.pack("<QIHH", 0x200000, 16, 1, 200) + struct.pack("<QIHH", 0x200100, 1, 2, 0),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CHAINS))
def test_hostile_virtqueue_needs_reset_and_the_backend_lives(qtest, image, run_dir, case):
    q = qtest("-drive", f"file={image},if=virtio", "-m", "64M")
    bar = 0xE0000000
    cfg_write(q, 0x20, bar)  # BAR4: the modern virtio structures
    cfg_write(q, 0x04, 0x0006)  # memory decode and bus master
    common = bar  # common cfg at BAR4+0 (backends/virtio/pci.py)
    q.cmd(f"writeb {common + 20:#x} 0")  # device_status: reset
    q.cmd(f"writeb {common + 20:#x} 3")  # ACKNOWLEDGE | DRIVER
    q.cmd(f"writel {common + 8:#x} 1")  # driver_feature_select = 1
    q.cmd(f"writel {common + 12:#x} 1")  # VIRTIO_F_VERSION_1 (bit 32)
    q.cmd(f"writeb {common + 20:#x} 11")  # FEATURES_OK
    assert int(q.cmd(f"readb {common + 20:#x}"), 16) & 8
    desc, avail, used = 0x100000, 0x101000, 0x102000
    q.cmd(f"writew {common + 22:#x} 0")  # queue_select 0
    q.cmd(f"writew {common + 24:#x} 8")  # queue_size 8
    for off, addr in ((32, desc), (40, avail), (48, used)):
        q.cmd(f"writel {common + off:#x} {addr:#x}")
        q.cmd(f"writel {common + off + 4:#x} 0")
    q.cmd(f"writew {common + 28:#x} 1")  # queue_enable
    q.cmd(f"writeb {common + 20:#x} 15")  # DRIVER_OK
    q.write(0x200000, struct.pack("<IIQ", 0, 0, 0))  # an IN request header, for the chains that get that far
    q.write(desc, HOSTILE_CHAINS[case])
    q.write(avail, struct.pack("<HHH", 0, 1, 0))
    notify_off = int(q.cmd(f"readw {common + 30:#x}"), 16)
    q.cmd(f"writew {bar + 0x3000 + 4 * notify_off:#x} 0")  # kick
    status = 0
    for _ in range(100):
        status = int(q.cmd(f"readb {common + 20:#x}"), 16)
        if status & 0x40:
            break
        q.cmd("wait_irq 20000")
    assert status & 0x40  # DEVICE_NEEDS_RESET
    assert int(q.read(used + 2, 2).hex(), 16) == 0  # nothing was "completed"
    row = backend_row(run_dir, "blk0")
    assert row["state"] == "running" and row["restarts"] == 0
    q.cmd(f"writeb {common + 20:#x} 0")  # reset clears it
    assert int(q.cmd(f"readb {common + 20:#x}"), 16) == 0
