"""The device kinds a backend process can host, and what the vcpu must know to route to them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from backends.serial import SerialPort
from backends.testdev import PciTestDevice

COM1_BASE, COM1_IRQ = 0x3F8, 4
COM2_BASE, COM2_IRQ = 0x2F8, 3


@dataclass
class DeviceSpec:
    """One backend: its name (serial0), device kind, and the ISA ports / IRQ it owns."""

    name: str
    kind: str
    ports: list[tuple[int, int]] = field(default_factory=list)  # (base, length)
    irq: int = -1
    pci_bdf: int | None = None  # bus<<8 | dev<<3 | fn
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "kind": self.kind, "ports": self.ports, "irq": self.irq,
            "pci_bdf": self.pci_bdf, "options": self.options,
        }

    @classmethod
    def from_dict(cls, d: dict) -> DeviceSpec:
        return cls(d["name"], d["kind"], [tuple(p) for p in d["ports"]], d["irq"], d["pci_bdf"], d["options"])


def serial_spec(index: int) -> DeviceSpec:
    base, irq = ((COM1_BASE, COM1_IRQ), (COM2_BASE, COM2_IRQ))[index]
    return DeviceSpec(f"serial{index}", "serial", [(base, 8)], irq)


PCI_INTX_LINES = (10, 11)  # where the firmware finds INTx wired, as on QEMU's pc machine


def testdev_spec(index: int, slot: int) -> DeviceSpec:
    return DeviceSpec(f"testdev{index}", "testdev", [], PCI_INTX_LINES[slot % 2], slot << 3)


def make_device(
    spec: DeviceSpec, tx: Callable[[int], None], irq: Callable[[bool], None]
) -> SerialPort | PciTestDevice:
    """The sans-I/O model for a spec, wired to the effects its host gives it."""
    if spec.kind == "serial":
        return SerialPort(spec.ports[0][0], tx, irq)
    if spec.kind == "testdev":
        return PciTestDevice(irq, spec.irq)
    raise ValueError(f"unknown device kind {spec.kind!r}")
