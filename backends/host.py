"""The process that hosts one device model: a transport around the sans-I/O model.

It maps its I/O sharing page and its state region (memfds held by the supervisor),
serves posted slots (steps 4 and 5), stages console output in the state region, and
raises or lowers its IRQ line by message to the vcpu. Started again after a death,
it restores the published model state and completes every slot still posted: one
whose seq was already applied gets its saved result, the others run now.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import msgpack
import zmq

from backends.block import BlockImage
from backends.devices import DeviceSpec, ModelEnv, irq_levels, make_device
from broker.layout import (
    BAR_IO,
    BAR_MEM,
    BAR_NONE,
    KIND_NAMES,
    KIND_PCI_CFG,
    KIND_PIO,
    NO_BAR,
    SLOT_DONE,
    SLOT_POSTED,
    map_io_page,
    map_state_region,
)
from broker.notify import (
    SLEEP_RECHECK_MS,
    AdaptiveSpin,
    broker_endpoint,
    done_endpoint,
    door_endpoint,
    drain,
    irq_endpoint,
    pull_socket,
    push_socket,
    ring,
)
from broker.state import StateStore
from vcpu.clock import now_ns
from vcpu.memory import GuestMemory, fence


class BackendHost:
    def __init__(
        self, spec: DeviceSpec, page_fd: int, state_fd: int, run_dir: Path, ncpus: int,
        ram: tuple[int, int] | None = None,
    ) -> None:
        self.spec = spec
        self.ncpus = ncpus
        self.page = map_io_page(page_fd)
        self.region = map_state_region(state_fd)
        self.store = StateStore(self.region)
        self.ctx = zmq.Context()
        self.door = pull_socket(self.ctx, door_endpoint(run_dir, spec.name))
        self.completions = [push_socket(self.ctx, done_endpoint(run_dir, i)) for i in range(ncpus)]
        self.irq_sock = push_socket(self.ctx, irq_endpoint(run_dir))
        self.events = push_socket(self.ctx, broker_endpoint(run_dir))
        self.lines: dict[int, bool] = {}
        self.lines_dirty = False
        self.model_errors = 0
        self.mem = GuestMemory(*ram) if ram else None
        env = ModelEnv(self._tx, self._set_line, self.mem, self._open_image)
        self.device = make_device(spec, env)
        if self.store.model_state is not None:
            self.device.restore(self.store.model_state)
        self.lines = irq_levels(spec, self.device)
        self.lines_dirty = True
        self.published_out = self.store.out_head
        self.spin = AdaptiveSpin()
        self.page.ptr.irq = spec.irqs[0] if spec.irqs else 0
        self._publish_bars()
        self.has_work = hasattr(self.device, "work")
        self.input_room = getattr(self.device, "input_room", None)  # a console model takes input
        self.work_stalled = False

    # -- effects the model asks for -------------------------------------------------
    def _tx(self, byte: int) -> None:
        self.store.stage_output(bytes((byte,)))

    def _open_image(self, drive: dict) -> BlockImage:
        return BlockImage(drive["fd"], drive["readonly"], drive["sector_size"], drive["cache"])

    def _set_line(self, line: int, level: bool) -> None:
        if self.lines.get(line) != level:
            self.lines[line] = level
            self.lines_dirty = True

    def _send_lines(self) -> None:
        """Publish the line levels in the page (the truth), then wake the vcpu."""
        mask = 0
        for line, level in self.lines.items():
            if level and 0 <= line < 32:
                mask |= 1 << line
        raised = mask & ~self.page.ptr.irq_lines
        self.page.ptr.irq_lines = mask
        self.lines_dirty = False
        ring(self.irq_sock, msgpack.packb([self.spec.name, mask, bool(raised)]))

    def _after_publish(self) -> None:
        # Levels follow the published state that implies them (a death in between is
        # repaired at restart, which republishes the restored model's levels).
        if self.lines_dirty:
            self._send_lines()
        if self.store.out_head != self.published_out:
            self.published_out = self.store.out_head
            if self.region.ptr.out_notify:
                self.region.ptr.out_notify = 0
                ring(self.events, msgpack.packb(["out", self.spec.name]))

    def _publish_bars(self) -> None:
        header = getattr(self.device, "pci", None)
        p = self.page.ptr
        if header is None:
            p.pci_bdf = 0xFFFFFFFF
            return
        p.pci_bdf = self.spec.pci_bdf
        for i in range(6):
            p.bars[i].kind = BAR_NONE
        for m in header.bar_map():
            b = p.bars[m.index]
            b.addr, b.size, b.enabled = m.addr, m.size, int(m.enabled)
            b.kind = BAR_IO if m.io else BAR_MEM
        for i, byte in enumerate(header.space):
            p.pci_config[i] = byte
        p.bar_generation += 1

    # -- serving ---------------------------------------------------------------------
    def serve_slot(self, i: int) -> None:
        slot = self.page.ptr.slots[i]
        seq = slot.seq
        if not self.store.applied(i, seq):
            slot.t_backend = now_ns()
            n = slot.size * slot.count
            data = bytes(slot.data[0:n]) if slot.is_write else b""
            try:
                result = self.access(slot.kind, slot.addr, slot.size, bool(slot.is_write), data, slot.count,
                                     slot.bar)
            except Exception as e:  # noqa: BLE001 - a model bug must not take the backend down
                self.model_errors += 1
                if self.model_errors <= 10:
                    print(f"splitvm: {self.spec.name}: model error on {KIND_NAMES.get(slot.kind)} "
                          f"0x{slot.addr:x}: {e!r}", file=sys.stderr)
                result = b"" if slot.is_write else b"\xff" * n
            if result:
                slot.data[0 : len(result)] = result
            self.store.publish(self.device.snapshot(), i, seq)
            self._after_publish()
            if slot.kind == KIND_PCI_CFG and slot.is_write:
                self._publish_bars()
        slot.t_done = now_ns()
        self.page.ptr.served += 1
        slot.state = SLOT_DONE
        fence()  # DONE visible before we read the vcpu's asleep flag
        if slot.vcpu_asleep:
            ring(self.completions[i], b"")

    def access(self, kind: int, addr: int, size: int, is_write: bool, data: bytes, count: int, bar: int) -> bytes:
        """Dispatch a slot to the model: ISA ports, PCI config space, or a BAR."""
        if kind == KIND_PCI_CFG:
            out = bytearray()
            for i in range(count):
                value = int.from_bytes(data[i * size : (i + 1) * size], "little") if is_write else 0
                result = self.device.config(addr & 0xFFF, size, is_write, value)
                if not is_write:
                    out += result.to_bytes(size, "little")
            return bytes(out)
        if kind == KIND_PIO and bar == NO_BAR:
            return self.device.pio(addr, size, is_write, data, count)
        out = bytearray()
        for i in range(count):
            chunk = data[i * size : (i + 1) * size] if is_write else b""
            out += self.device.bar_access(bar, addr + (0 if kind == KIND_PIO else i * size), size, is_write, chunk)
        return bytes(out)

    def pull_input(self) -> None:
        if self.input_room is None or not self.store.input_available():
            return
        n = self.input_room()
        if n:
            self.device.receive(self.store.take_input(n))
            self.store.publish(self.device.snapshot())
            self._after_publish()

    def posted(self) -> list[int]:
        slots = self.page.ptr.slots
        if self.ncpus == 1:  # the common case, on the hot path of every spin
            return [0] if slots[0].state == SLOT_POSTED else []
        return [i for i in range(self.ncpus) if slots[i].state == SLOT_POSTED]

    def do_work(self) -> None:
        """One chunk of the work the model does outside any access (a DMA, a kicked queue)."""
        try:
            self.device.work()
        except Exception as e:  # noqa: BLE001 - a model bug must not take the backend down
            self.model_errors += 1
            self.work_stalled = True  # not again until the guest's next access
            print(f"splitvm: {self.spec.name}: model error in work: {e!r}", file=sys.stderr)
        self.store.publish(self.device.snapshot())
        self._after_publish()

    def work_pending(self) -> bool:
        return self.has_work and not self.work_stalled and self.device.work_pending()

    def run(self) -> None:
        # After a restart: tell the vcpu the line levels the published state implies (a
        # restored model re-arms its own work: an interrupted DMA, heads in flight).
        self._send_lines()
        page = self.page.ptr
        while True:
            served = self.posted()
            for i in served:
                self.serve_slot(i)
            if served:
                self.work_stalled = False
            self.pull_input()
            if self.work_pending():
                self.do_work()
                # This loop may poll a ring for a while (virtio), and so may the guest's vCPU;
                # two spinners on one core take turns by whole time slices. Yielding after each
                # chunk lets the peer run: without it 5 of 28 qd16 read passes ran 8x slower
                # (docs/benchmarks.md), with it 1 of 49. A yield with nobody waiting is ~1 µs.
                os.sched_yield()
                continue
            if served:
                continue
            if self.spin.spin(lambda: bool(self.posted())):
                continue
            page.backend_asleep = 1
            fence()  # asleep flag visible before we look at the slots (the vcpu does the mirror)
            while not self.posted() and not self._input_waiting():
                if self.door.poll(SLEEP_RECHECK_MS * 10):
                    drain(self.door)
            page.backend_asleep = 0
            drain(self.door)
            self.spin.woke()

    def _input_waiting(self) -> bool:
        return self.input_room is not None and self.store.input_available() > 0 and self.input_room() > 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="splitvm-backend")
    ap.add_argument("--spec", required=True)
    ap.add_argument("--page-fd", type=int, required=True)
    ap.add_argument("--state-fd", type=int, required=True)
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--ncpus", type=int, required=True)
    ap.add_argument("--ram-fd", type=int)
    ap.add_argument("--ram-size", type=int)
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we end
    spec = DeviceSpec.from_dict(json.loads(a.spec))
    ram = (a.ram_fd, a.ram_size) if a.ram_fd is not None else None
    host = BackendHost(spec, a.page_fd, a.state_fd, a.run_dir, a.ncpus, ram)
    host.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
