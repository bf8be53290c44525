"""The device kinds a backend process can host, and what the vcpu must know to route to them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

COM1_BASE, COM1_IRQ = 0x3F8, 4
COM2_BASE, COM2_IRQ = 0x2F8, 3
IDE_PORTS = [(0x1F0, 8), (0x3F6, 1), (0x170, 8), (0x376, 1)]
IDE_IRQS = [14, 15]
# The ATA data registers: a `rep outsw` of a sector is 256 OUTs. Their writes are
# coalesced (KVM_CAP_COALESCED_PIO, and the router) and reach ide0 as one string write.
IDE_DATA_PORTS = [0x1F0, 0x170]
PCI_INTX_LINES = (10, 11)  # where INTx of a slot is wired: 10 for even slots, 11 for odd, as the firmware reads


@dataclass
class DeviceSpec:
    """One backend: its name (serial0), device kind, and the ISA ports / IRQ lines it owns."""

    name: str
    kind: str
    ports: list[tuple[int, int]] = field(default_factory=list)  # (base, length)
    irqs: list[int] = field(default_factory=list)
    pci_bdf: int | None = None  # bus<<8 | dev<<3 | fn
    options: dict = field(default_factory=dict)  # kind-specific: drives, dma

    def to_dict(self) -> dict:
        return {
            "name": self.name, "kind": self.kind, "ports": self.ports, "irqs": self.irqs,
            "pci_bdf": self.pci_bdf, "options": self.options,
        }

    @classmethod
    def from_dict(cls, d: dict) -> DeviceSpec:
        return cls(d["name"], d["kind"], [tuple(p) for p in d["ports"]], d["irqs"], d["pci_bdf"], d["options"])

    @property
    def needs_ram(self) -> bool:
        """Does its model do DMA (so its process maps guest RAM)?"""
        return self.kind in ("ide", "virtio-blk")


def serial_spec(index: int) -> DeviceSpec:
    base, irq = ((COM1_BASE, COM1_IRQ), (COM2_BASE, COM2_IRQ))[index]
    return DeviceSpec(f"serial{index}", "serial", [(base, 8)], [irq])


def pci_line(slot: int) -> int:
    return PCI_INTX_LINES[slot % 2]


def testdev_spec(index: int, slot: int) -> DeviceSpec:
    return DeviceSpec(f"testdev{index}", "testdev", [], [pci_line(slot)], slot << 3)


def ide_spec(slot: int, drives: list[dict | None]) -> DeviceSpec:
    """The PIIX3 IDE function with its legacy ports; drives[i] = {fd, media, readonly, serial, model} or None."""
    return DeviceSpec("ide0", "ide", list(IDE_PORTS), list(IDE_IRQS), slot << 3,
                      {"drives": drives, "coalesced_ports": IDE_DATA_PORTS})


def virtio_blk_spec(index: int, slot: int, drive: dict) -> DeviceSpec:
    return DeviceSpec(f"blk{index}", "virtio-blk", [], [pci_line(slot)], slot << 3, {"drive": drive})


@dataclass
class ModelEnv:
    """The effects a host hands a model: console bytes, interrupt lines, guest RAM, images."""

    tx: Callable[[int], None]
    set_line: Callable[[int, bool], None]
    mem: object | None = None
    open_image: Callable[[dict], object] | None = None


def make_device(spec: DeviceSpec, env: ModelEnv) -> object:
    """The sans-I/O model for a spec, wired to the effects its host gives it."""
    if spec.kind == "serial":
        from backends.serial import SerialPort

        line = spec.irqs[0]
        return SerialPort(spec.ports[0][0], env.tx, lambda level: env.set_line(line, level))
    if spec.kind == "testdev":
        from backends.testdev import PciTestDevice

        line = spec.irqs[0]
        return PciTestDevice(lambda level: env.set_line(line, level), line)
    if spec.kind == "ide":
        from backends.ide import IdeDriveSpec, PiixIde

        drives = [
            None if d is None else IdeDriveSpec(env.open_image(d), d["media"], d["serial"], d["model"])
            for d in spec.options["drives"]
        ]
        return PiixIde(env.mem, drives, lambda level: env.set_line(14, level), lambda level: env.set_line(15, level))
    if spec.kind == "virtio-blk":
        from backends.virtio.blk import VirtioBlk

        d = spec.options["drive"]
        line = spec.irqs[0]
        return VirtioBlk(env.mem, env.open_image(d), lambda level: env.set_line(line, level), serial=d["serial"],
                         readonly=d["readonly"], irq_line=line)
    raise ValueError(f"unknown device kind {spec.kind!r}")


def irq_levels(spec: DeviceSpec, model: object) -> dict[int, bool]:
    """The line levels a (restored) model implies, to republish after a restart."""
    if spec.kind == "ide":
        return dict(zip(IDE_IRQS, model.irq_levels(), strict=True))
    return {spec.irqs[0]: bool(model.irq_level())} if spec.irqs else {}
