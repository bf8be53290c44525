"""The paravirtual platform ports, owned by the vcpu (DESIGN.md "Guest firmware").

All 32-bit. 0x500 in: signature 'SPVM'. 0x504 out: exit with code. 0x508 out: wait up
to N µs for an interrupt; in: asserted IRQ lines. 0x50C out: select boot-info item;
0x510 in: its value. 0x514 in (8-bit): next command-line byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from vcpu.accel import GuestExit
from vcpu.irq import InterruptState

PLATFORM_BASE = 0x500
PLATFORM_LEN = 0x20
SIGNATURE = 0x4D565053  # 'SPVM'
PORT_SIGNATURE, PORT_EXIT, PORT_WAIT, PORT_INFO_SELECT, PORT_INFO_DATA, PORT_CMDLINE = (
    0x500, 0x504, 0x508, 0x50C, 0x510, 0x514,
)
PORT_NAMES = {PORT_SIGNATURE: "signature", PORT_EXIT: "exit", PORT_WAIT: "wait", PORT_INFO_SELECT: "info",
              PORT_INFO_DATA: "info", PORT_CMDLINE: "cmdline"}
INFO_RAM_LO, INFO_RAM_HI, INFO_NCPUS, INFO_TSC_KHZ, INFO_CMDLINE_LEN = range(5)
MAX_WAIT_US = 1_000_000
CMDLINE_MAX = 4096  # the firmware's command-line buffer, NUL included (vcpu/guest/main.c)


@dataclass
class BootInfo:
    ram_size: int
    ncpus: int
    tsc_khz: int
    cmdline: bytes


class PlatformPorts:
    def __init__(self, boot: BootInfo, irq: InterruptState) -> None:
        self.boot = boot
        self.irq = irq
        self.select = 0
        self.cmdline_pos = 0
        self.accesses = dict.fromkeys(PORT_NAMES.values(), 0)  # per port, for info exits

    def owns(self, port: int) -> bool:
        return PLATFORM_BASE <= port < PLATFORM_BASE + PLATFORM_LEN

    def info(self, item: int) -> int:
        b = self.boot
        return {
            INFO_RAM_LO: b.ram_size & 0xFFFFFFFF,
            INFO_RAM_HI: b.ram_size >> 32,
            INFO_NCPUS: b.ncpus,
            INFO_TSC_KHZ: b.tsc_khz,
            INFO_CMDLINE_LEN: len(b.cmdline),
        }.get(item, 0)

    def count(self, port: int) -> None:
        name = PORT_NAMES.get(port)
        if name is not None:
            self.accesses[name] += 1

    def read(self, port: int, size: int) -> int:
        self.count(port)
        if port == PORT_SIGNATURE:
            return SIGNATURE
        if port == PORT_WAIT:
            return self.irq.pending()
        if port == PORT_INFO_DATA:
            return self.info(self.select)
        if port == PORT_CMDLINE:
            if self.cmdline_pos < len(self.boot.cmdline):
                self.cmdline_pos += 1
                return self.boot.cmdline[self.cmdline_pos - 1]
            return 0
        return (1 << (8 * size)) - 1

    def write(self, port: int, size: int, value: int) -> None:
        self.count(port)
        if port == PORT_EXIT:
            raise GuestExit(value & 0xFF)
        if port == PORT_WAIT:
            self.irq.wait(min(value, MAX_WAIT_US) / 1e6)
        elif port == PORT_INFO_SELECT:
            self.select = value
            if value == INFO_CMDLINE_LEN:
                self.cmdline_pos = 0
