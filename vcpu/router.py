"""Address-space routing in the vcpu: which owner handles a trapped access (step 3).

Owners: the platform ports and the PCI host bridge (the vcpu's own), ISA port ranges
of backends, PCI config space by BDF, and PCI BARs, decoded by each backend's PCI
header and published in its sharing page (re-read when its bar_generation moves).
Unowned accesses read all-ones and drop writes, counted (PCI master abort).
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TextIO

from backends.pci import PciConfigHeader
from broker.layout import BAR_IO, BAR_MEM, KIND_MMIO, KIND_NAMES, KIND_PCI_CFG, KIND_PIO, NO_BAR, Mapped
from broker.sharing import SlotClient, Timing
from vcpu.clock import now_ns
from vcpu.platform import PlatformPorts

PCI_CONFIG_ADDRESS = 0xCF8
PCI_CONFIG_DATA = 0xCFC
HOST_BRIDGE_BDF = 0x0000
SAMPLES_KEPT = 20000
SLOT_ELEMENTS_MAX = 4096  # bytes a slot carries (broker.layout.SLOT_DATA)


def host_bridge() -> PciConfigHeader:
    """00:00.0, the i440FX host bridge QEMU also shows (8086:1237, class 0600)."""
    return PciConfigHeader(0x8086, 0x1237, 0x060000, revision=0x02)


@dataclass
class DeviceStats:
    accesses: int = 0
    round_trips_ns: deque = field(default_factory=lambda: deque(maxlen=SAMPLES_KEPT))

    def summary(self) -> dict:
        s = sorted(self.round_trips_ns)
        if not s:
            return {"accesses": self.accesses, "median_us": None, "p99_us": None}
        return {
            "accesses": self.accesses,
            "median_us": round(statistics.median(s) / 1000, 1),
            "p99_us": round(s[min(len(s) - 1, int(len(s) * 0.99))] / 1000, 1),
        }


@dataclass
class Backend:
    """What the router knows of one backend: its page, and one SlotClient per vCPU."""

    name: str
    page: Mapped
    clients: list[SlotClient]
    ports: list[tuple[int, int]]
    pci_bdf: int | None
    coalesced_ports: list[int] = field(default_factory=list)
    bar_generation: int = -1


class Router:
    def __init__(self, platform: PlatformPorts, backends: list[Backend], trace: TextIO | None = None) -> None:
        self.platform = platform
        self.backends = {b.name: b for b in backends}
        self.host_bridge = host_bridge()
        self.cf8 = 0
        self.ports: dict[int, Backend] = {}
        for b in backends:
            for base, length in b.ports:
                for p in range(base, base + length):
                    self.ports[p] = b
        self.by_bdf = {b.pci_bdf: b for b in backends if b.pci_bdf is not None}
        self.io_bars: dict[int, tuple[Backend, int, int]] = {}  # port -> (backend, bar, base)
        self.mem_bars: list[tuple[int, int, Backend, int]] = []  # (start, end, backend, bar)
        self.stats: dict[str, DeviceStats] = {b.name: DeviceStats() for b in backends}
        self.unowned = {"pio_read": 0, "pio_write": 0, "mmio_read": 0, "mmio_write": 0}
        self.trace = trace
        self.trace_lock = threading.Lock()
        # Writes to these ports are buffered and sent as one string write just before the
        # vCPU's next other access (which is when the device could first tell).
        self.coalesced = {p: b for b in backends for p in b.coalesced_ports}
        self.pending: dict[int, tuple] = {}  # cpu -> (backend, port, size, data, count, t_exit)
        for b in backends:
            self._refresh_bars(b)

    # -- BAR decoding ------------------------------------------------------------------
    def _refresh_bars(self, b: Backend) -> None:
        page = b.page.ptr
        if page.bar_generation == b.bar_generation:
            return
        b.bar_generation = page.bar_generation
        self.io_bars = {p: v for p, v in self.io_bars.items() if v[0] is not b}
        mem = [m for m in self.mem_bars if m[2] is not b]
        for i in range(6):
            bar = page.bars[i]
            if not bar.enabled or bar.addr == 0:
                continue
            if bar.kind == BAR_IO:
                for p in range(bar.addr, min(bar.addr + bar.size, 0x10000)):
                    self.io_bars[p] = (b, i, bar.addr)
            elif bar.kind == BAR_MEM:
                mem.append((bar.addr, bar.addr + bar.size, b, i))
        self.mem_bars = mem

    def _refresh_all(self) -> bool:
        """Before calling an access unowned: did some backend (say, restarted) move a BAR?"""
        moved = [b for b in self.backends.values() if b.page.ptr.bar_generation != b.bar_generation]
        for b in moved:
            self._refresh_bars(b)
        return bool(moved)

    # -- the accelerator's entry points --------------------------------------------------
    def pio(self, cpu: int, port: int, size: int, is_write: bool, data: bytes, count: int) -> bytes:
        t_exit = now_ns()
        if is_write and port in self.coalesced:
            return self._coalesce(cpu, port, size, data, count, t_exit)
        if cpu in self.pending:
            self.flush(cpu)
        owner = self.ports.get(port)
        if owner is not None:
            return self._forward(owner, cpu, KIND_PIO, port, size, is_write, data, count, NO_BAR, t_exit)
        if self.platform.owns(port):
            return self._local(self.platform.read, self.platform.write, port, size, is_write, data, count)
        if PCI_CONFIG_ADDRESS <= port < PCI_CONFIG_ADDRESS + 8:
            return self._pci_config(cpu, port, size, is_write, data, count, t_exit)
        bar = self.io_bars.get(port)
        if bar is None and self._refresh_all():
            bar = self.io_bars.get(port)
        if bar is not None:
            b, index, base = bar
            return self._forward(b, cpu, KIND_PIO, port - base, size, is_write, data, count, index, t_exit)
        self.unowned["pio_write" if is_write else "pio_read"] += count
        return b"" if is_write else b"\xff" * (size * count)

    def mmio(self, cpu: int, addr: int, size: int, is_write: bool, data: bytes) -> bytes:
        t_exit = now_ns()
        if cpu in self.pending:
            self.flush(cpu)
        for _ in range(2):
            for start, end, b, index in self.mem_bars:
                if start <= addr < end:
                    return self._forward(b, cpu, KIND_MMIO, addr - start, size, is_write, data, 1, index, t_exit)
            if not self._refresh_all():
                break
        self.unowned["mmio_write" if is_write else "mmio_read"] += 1
        return b"" if is_write else b"\xff" * size

    # -- coalesced string writes ---------------------------------------------------------
    def _coalesce(self, cpu: int, port: int, size: int, data: bytes, count: int, t_exit: int) -> bytes:
        p = self.pending.get(cpu)
        if p is not None and (p[1] != port or p[2] != size or p[4] + count > SLOT_ELEMENTS_MAX // size):
            self.flush(cpu)
            p = None
        if p is None:
            self.pending[cpu] = (self.coalesced[port], port, size, bytearray(data), count, t_exit)
        else:
            p[3].extend(data)
            self.pending[cpu] = (p[0], port, size, p[3], p[4] + count, p[5])
        return b""

    def flush(self, cpu: int) -> None:
        """Send this vCPU's buffered writes (one slot, with a count) before anything else."""
        p = self.pending.pop(cpu, None)
        if p is not None:
            b, port, size, data, count, t_exit = p
            self._forward(b, cpu, KIND_PIO, port, size, True, bytes(data), count, NO_BAR, t_exit)

    # -- owners ------------------------------------------------------------------------
    @staticmethod
    def _local(read: callable, write: callable, port: int, size: int, is_write: bool, data: bytes, count: int) -> bytes:
        out = bytearray()
        for i in range(count):
            if is_write:
                write(port, size, int.from_bytes(data[i * size : (i + 1) * size], "little"))
            else:
                out += (read(port, size) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        return bytes(out)

    def _pci_config(
        self, cpu: int, port: int, size: int, is_write: bool, data: bytes, count: int, t_exit: int
    ) -> bytes:
        if port == PCI_CONFIG_ADDRESS and size == 4:
            if is_write:
                self.cf8 = int.from_bytes(data[-4:], "little") & 0x80FFFFFC
                return b""
            return self.cf8.to_bytes(4, "little") * count
        if port < PCI_CONFIG_DATA:
            self.unowned["pio_write" if is_write else "pio_read"] += count
            return b"" if is_write else b"\xff" * (size * count)
        offset = (self.cf8 & 0xFC) + (port - PCI_CONFIG_DATA)
        bdf = (self.cf8 >> 8) & 0xFFFF
        enabled = bool(self.cf8 & 0x80000000)
        if enabled and bdf == HOST_BRIDGE_BDF:
            hb = self.host_bridge
            return self._local(lambda _p, s: hb.read(offset, s), lambda _p, s, v: hb.write(offset, s, v),
                               port, size, is_write, data, count)
        owner = self.by_bdf.get(bdf) if enabled else None
        if owner is None:
            return b"" if is_write else b"\xff" * (size * count)  # no device: vendor reads 0xFFFF
        result = self._forward(owner, cpu, KIND_PCI_CFG, (bdf << 12) | offset, size, is_write, data, count, 0, t_exit)
        if is_write:
            self._refresh_bars(owner)
        return result

    def _forward(self, b: Backend, cpu: int, kind: int, addr: int, size: int, is_write: bool, data: bytes,
                 count: int, bar: int, t_exit: int) -> bytes:
        timing = Timing(b.name, kind, addr, size, is_write, t_exit, count)
        result = b.clients[cpu].access(kind, addr, size, is_write, data, count, bar, timing)
        timing.t_resume = now_ns()
        st = self.stats[b.name]
        st.accesses += 1
        st.round_trips_ns.append(timing.t_resume - t_exit)
        if self.trace is not None:
            self._trace(cpu, timing)
        return result

    def _trace(self, cpu: int, t: Timing) -> None:
        def us(a: int, b: int) -> str:
            return f"{(b - a) / 1000:.1f}" if a and b else "-"

        line = (
            f"{t.t_exit} cpu={cpu} dev={t.device} {KIND_NAMES[t.kind]} {'w' if t.is_write else 'r'} "
            f"addr=0x{t.addr:x} size={t.size} count={t.count} "
            f"exit={us(t.t_exit, t.t_post)} post={us(t.t_post, t.t_backend)} "
            f"backend={us(t.t_backend, t.t_done)} complete={us(t.t_done, t.t_seen)} "
            f"resume={us(t.t_seen, t.t_resume)} total={us(t.t_exit, t.t_resume)}\n"
        )
        with self.trace_lock:
            self.trace.write(line)

    def exit_stats(self) -> dict:
        return {"devices": {n: s.summary() for n, s in self.stats.items()}, "unowned": dict(self.unowned),
                "platform": dict(self.platform.accesses)}
