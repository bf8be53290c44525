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
