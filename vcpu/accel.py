"""What an accelerator asks of the vcpu process: route one trapped access."""

from __future__ import annotations

from typing import Protocol


class GuestExit(Exception):
    """The guest asked to end the VM (platform exit port) with this exit code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class GuestCrash(Exception):
    """The guest faulted (KVM shutdown, unicorn error): a report, never a hang."""


class AccessRouter(Protocol):
    def pio(self, cpu: int, port: int, size: int, is_write: bool, data: bytes, count: int) -> bytes:
        """Emulate IN/OUT (count > 1 for rep ins/outs); return size*count bytes for IN."""
        ...

    def mmio(self, cpu: int, addr: int, size: int, is_write: bool, data: bytes) -> bytes:
        ...


def is_rep_string(code: bytes, out: bool) -> bool:
    """Do these instruction bytes start `rep ins` (or `rep outs`)? Prefixes F3 and 66 in any order."""
    i, rep = 0, False
    while i < min(3, len(code) - 1) and code[i] in (0xF3, 0x66):
        rep = rep or code[i] == 0xF3
        i += 1
    return rep and i < len(code) and code[i] in ((0x6E, 0x6F) if out else (0x6C, 0x6D))
