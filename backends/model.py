"""What a device model offers its transports (backend host, qtest, unit tests).

A model is sans-I/O: it is given handles at construction (guest RAM, a disk image,
callables for its interrupt lines and console bytes) and knows nothing of processes,
ZeroMQ, KVM or the sharing page. Every method is optional but the ones a transport
routes to it.
"""

from __future__ import annotations

from typing import Protocol

from backends.pci import PciConfigHeader


class DeviceModel(Protocol):
    pci: PciConfigHeader | None  # a PCI function: its type-0 header

    def pio(self, port: int, size: int, is_write: bool, data: bytes, count: int) -> bytes:
        """A fixed ISA port (not a BAR). `count` > 1 is string I/O (rep ins/outs):
        data holds size*count bytes for writes; return size*count bytes for reads."""
        ...

    def config(self, offset: int, size: int, is_write: bool, value: int) -> int:
        """PCI configuration space access (offset 0..255)."""
        ...

    def bar_access(self, bar: int, offset: int, size: int, is_write: bool, data: bytes) -> bytes:
        """An access to BAR `bar` at `offset` (MMIO, or I/O for an I/O BAR)."""
        ...

    def work_pending(self) -> bool:
        """Is there work that is not an answer to an access (a kicked virtqueue, an armed
        DMA)? Cheap: the host asks after every access it serves."""
        ...

    def work(self) -> bool:
        """Do a bounded chunk of that work; return True while more remains. The host
        publishes the model's state after each call."""
        ...

    def snapshot(self) -> dict:
        """All model state, msgpack-able, at most broker.layout.STATE_MODEL_BYTES packed."""
        ...

    def restore(self, state: dict) -> None:
        """Take a snapshot back, in a new process after a death. Must also re-arm work
        that was in flight (see the restart contract in DESIGN.md)."""
        ...
