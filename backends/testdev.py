"""testdev: splitvm's PCI test function, for exercising BAR routing and INTx from a guest.

Not a model of real hardware (its IDs are splitvm's own, 5056:0001, class 00ff). It
exists so that a guest, a qtest script or a student can move BARs, poke MMIO and raise
a level-triggered interrupt through a backend process and see each step.

Registers, the same at BAR0 (4 KiB of MMIO) and BAR1 (32 bytes of I/O), 32-bit:
  0x00 ID        'SVTD' (0x44545653), read-only
  0x04 SCRATCH   read/write
  0x08 IRQ       write 1: assert INTA, write 0: deassert; reads the level
  0x0C ACCESSES  how many register accesses the device has served, read-only
  0x100-0xFFF    scratch memory (BAR0 only), any access size
"""

from __future__ import annotations

from collections.abc import Callable

from backends.pci import BarSpec, PciConfigHeader

TESTDEV_VENDOR, TESTDEV_DEVICE, TESTDEV_CLASS = 0x5056, 0x0001, 0x00FF00
REG_ID, REG_SCRATCH, REG_IRQ, REG_ACCESSES = 0x00, 0x04, 0x08, 0x0C
ID_VALUE = 0x44545653
MEMORY_BASE, BAR0_SIZE, BAR1_SIZE = 0x100, 0x1000, 0x20


class PciTestDevice:
    kind = "testdev"

    def __init__(self, irq: Callable[[bool], None], irq_line: int) -> None:
        self.pci = PciConfigHeader(
            TESTDEV_VENDOR, TESTDEV_DEVICE, TESTDEV_CLASS, revision=1,
            bars=[BarSpec(BAR0_SIZE), BarSpec(BAR1_SIZE, io=True)], interrupt_pin=1,
        )
        self.pci.space[0x3C] = irq_line  # what a BIOS would write: the line INTA is wired to
        self.irq = irq
        self.scratch = 0
        self.level = False
        self.accesses = 0
        self.memory = bytearray(BAR0_SIZE - MEMORY_BASE)

    def config(self, offset: int, size: int, is_write: bool, value: int) -> int:
        if is_write:
            self.pci.write(offset, size, value)
            return 0
        return self.pci.read(offset, size)

    def bar_access(self, bar: int, offset: int, size: int, is_write: bool, data: bytes) -> bytes:
        if bar == 0 and offset >= MEMORY_BASE:
            start = offset - MEMORY_BASE
            if start + size > len(self.memory):
                return b"" if is_write else b"\xff" * size
            if is_write:
                self.memory[start : start + size] = data
                return b""
            return bytes(self.memory[start : start + size])
        self.accesses += 1
        reg = offset & ~3
        shift = 8 * (offset & 3)
        if is_write:
            value = int.from_bytes(data, "little") << shift
            if reg == REG_SCRATCH:
                mask = ((1 << (8 * size)) - 1) << shift
                self.scratch = (self.scratch & ~mask & 0xFFFFFFFF) | (value & mask)
            elif reg == REG_IRQ:
                self.set_level(bool(value & 1))
            return b""
        value = {REG_ID: ID_VALUE, REG_SCRATCH: self.scratch, REG_IRQ: int(self.level),
                 REG_ACCESSES: self.accesses & 0xFFFFFFFF}.get(reg, 0)
        return ((value >> shift) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def set_level(self, level: bool) -> None:
        if level != self.level:
            self.level = level
            self.irq(level)

    def irq_level(self) -> bool:
        return self.level

    def snapshot(self) -> dict:
        return {"pci": self.pci.snapshot(), "scratch": self.scratch, "level": self.level,
                "accesses": self.accesses, "memory": bytes(self.memory)}

    def restore(self, s: dict) -> None:
        self.pci.restore(s["pci"])
        self.scratch, self.level, self.accesses = s["scratch"], s["level"], s["accesses"]
        self.memory[:] = s["memory"]
