"""PCI type-0 configuration header (PCI Local Bus Spec 3.0, section 6.1), reused by every PCI device.

Sans-I/O: config reads and writes in, the BAR map out. The owner of the device
(a backend, or the vcpu for the host bridge) publishes `bar_map()` so the vcpu can
route BAR accesses (decoded from these config writes, remapped when the guest moves them).
"""

from __future__ import annotations

from dataclasses import dataclass

# Register offsets (spec 6.1, figure 6-1).
VENDOR_ID, DEVICE_ID, COMMAND, STATUS = 0x00, 0x02, 0x04, 0x06
REVISION_ID, PROG_IF, SUBCLASS, CLASS_CODE = 0x08, 0x09, 0x0A, 0x0B
CACHE_LINE_SIZE, LATENCY_TIMER, HEADER_TYPE = 0x0C, 0x0D, 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID = 0x2C, 0x2E
EXPANSION_ROM = 0x30
CAPABILITIES_PTR = 0x34
INTERRUPT_LINE, INTERRUPT_PIN = 0x3C, 0x3D

# Command register bits (6.2.2).
CMD_IO, CMD_MEMORY, CMD_BUS_MASTER = 0x1, 0x2, 0x4
CMD_WRITABLE = 0x0001 | 0x0002 | 0x0004 | 0x0040 | 0x0100 | 0x0400  # io mem master parity serr intx-disable
STATUS_RW1C = 0xF900  # parity/abort/serr bits are write-one-to-clear (6.2.3)
STATUS_CAP_LIST = 0x0010

BAR_IO_FLAG = 0x1
BAR_MEM_64 = 0x4
BAR_MEM_PREFETCH = 0x8


@dataclass(frozen=True)
class BarSpec:
    """One BAR: its size (a power of two) and whether it decodes I/O or memory."""

    size: int
    io: bool = False
    is64: bool = False
    prefetchable: bool = False

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size & (self.size - 1):
            raise ValueError(f"BAR size {self.size:#x} is not a power of two")
        if self.io and (self.size < 4 or self.size > 256 or self.is64):
            raise ValueError("an I/O BAR is 4..256 bytes and 32-bit")
        if not self.io and self.size < 16:
            raise ValueError("a memory BAR is at least 16 bytes")

    def flags(self) -> int:
        if self.io:
            return BAR_IO_FLAG
        return (BAR_MEM_64 if self.is64 else 0) | (BAR_MEM_PREFETCH if self.prefetchable else 0)


@dataclass(frozen=True)
class BarMapping:
    index: int
    io: bool
    addr: int
    size: int
    enabled: bool


class PciConfigHeader:
    """256 bytes of type-0 config space with the write semantics of each field."""

    def __init__(
        self,
        vendor: int,
        device: int,
        class_code: int,
        revision: int = 0,
        bars: list[BarSpec | None] | None = None,
        interrupt_pin: int = 0,
        subsystem_vendor: int = 0,
        subsystem: int = 0,
        multifunction: bool = False,
    ) -> None:
        self.bars: list[BarSpec | None] = list(bars or []) + [None] * (6 - len(bars or []))
        if len(self.bars) > 6:
            raise ValueError("at most 6 BARs")
        for i, b in enumerate(self.bars):
            if b is not None and b.is64 and (i == 5 or self.bars[i + 1] is not None):
                raise ValueError(f"64-bit BAR{i} needs BAR{i + 1} free for its upper half")
        self.space = bytearray(256)
        self._put(VENDOR_ID, 2, vendor)
        self._put(DEVICE_ID, 2, device)
        self._put(REVISION_ID, 1, revision)
        self._put(PROG_IF, 3, class_code)
        self._put(HEADER_TYPE, 1, 0x80 if multifunction else 0)
        self._put(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor)
        self._put(SUBSYSTEM_ID, 2, subsystem)
        self._put(INTERRUPT_PIN, 1, interrupt_pin)
        for i, b in enumerate(self.bars):
            if b is not None:
                self._put(BAR0 + 4 * i, 4, b.flags())

    def _get(self, off: int, size: int) -> int:
        return int.from_bytes(self.space[off : off + size], "little")

    def _put(self, off: int, size: int, value: int) -> None:
        self.space[off : off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    @property
    def command(self) -> int:
        return self._get(COMMAND, 2)

    def read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset < 0 or offset + size > 256:
            return (1 << (8 * max(size, 1))) - 1
        return self._get(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest config write: each byte goes to its field's own rule."""
        if size not in (1, 2, 4) or offset < 0 or offset + size > 256:
            return
        for i in range(size):
            self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)

    def _write_byte(self, off: int, byte: int) -> None:
        if off in (COMMAND, COMMAND + 1):
            mask = (CMD_WRITABLE >> (8 * (off - COMMAND))) & 0xFF
            self.space[off] = (self.space[off] & ~mask) | (byte & mask)
        elif off in (STATUS, STATUS + 1):
            rw1c = (STATUS_RW1C >> (8 * (off - STATUS))) & 0xFF
            self.space[off] &= ~(byte & rw1c) & 0xFF
        elif off in (CACHE_LINE_SIZE, LATENCY_TIMER, INTERRUPT_LINE):
            self.space[off] = byte
        elif BAR0 <= off < BAR0 + 24:
            self._write_bar_byte((off - BAR0) // 4, off % 4, byte)
        # Everything else (IDs, class, header type, pin, ROM: none) is read-only.

    def _bar_owner(self, index: int) -> tuple[int, bool]:
        """(index of the BAR that decodes this register, whether it is the upper half)."""
        if index > 0 and self.bars[index - 1] is not None and self.bars[index - 1].is64:
            return index - 1, True
        return index, False

    def _write_bar_byte(self, index: int, lane: int, byte: int) -> None:
        owner, upper = self._bar_owner(index)
        spec = self.bars[owner]
        reg = BAR0 + 4 * index + lane
        if spec is None:
            return  # unimplemented BARs read as zero (6.2.5.1)
        size_mask = spec.size - 1
        if upper:
            mask = ~(size_mask >> 32) & 0xFFFFFFFF
        else:
            mask = ~size_mask & 0xFFFFFFFF & ~(0x3 if spec.io else 0xF)
        lane_mask = (mask >> (8 * lane)) & 0xFF
        self.space[reg] = (self.space[reg] & ~lane_mask & 0xFF) | (byte & lane_mask)

    def bar_address(self, index: int) -> int:
        spec = self.bars[index]
        if spec is None:
            return 0
        low = self._get(BAR0 + 4 * index, 4)
        addr = low & (~0x3 if spec.io else ~0xF) & 0xFFFFFFFF
        if spec.is64:
            addr |= self._get(BAR0 + 4 * (index + 1), 4) << 32
        return addr

    def bar_map(self) -> list[BarMapping]:
        """Where each BAR decodes now; enabled follows the command register's I/O/memory bits."""
        cmd = self.command
        out = []
        for i, spec in enumerate(self.bars):
            if spec is None:
                continue
            addr = self.bar_address(i)
            on = bool(cmd & (CMD_IO if spec.io else CMD_MEMORY)) and addr != 0
            out.append(BarMapping(i, spec.io, addr, spec.size, on))
        return out

    def snapshot(self) -> bytes:
        return bytes(self.space)

    def restore(self, space: bytes) -> None:
        self.space[:] = space
