"""The virtio-pci transport (virtio 1.x, section 4.1), modern and legacy, as one
transitional PCI function. Devices (blk now; net and balloon later) subclass
VirtioPciFunction and supply features, config bytes, queue count and process_queue().

BAR layout:
  BAR0  I/O, legacy header (4.1.4.10) then the device config at 0x14 (no MSI-X)
  BAR4  16 KiB memory: common cfg 0x0000, ISR 0x1000, device cfg 0x2000,
        notify 0x3000 (queue n at 0x3000 + 4*n: notify_off = n, multiplier 4)
INTx only: the line is high while ISR != 0 (4.1.4.5); reading ISR clears it.

Kicks never run a queue inside the trapped access: they mark it, and the host calls
work() afterwards (a bounded chunk per call; True while more remains).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import cffi

from backends.pci import CAPABILITIES_PTR, STATUS, STATUS_CAP_LIST, BarSpec, PciConfigHeader
from backends.virtio.queue import DEFAULT_QUEUE_MAX, Virtqueue, VirtqueueError
from vcpu.memory import GuestMemory, GuestMemoryError

# Register layouts, each declared once (4.1.4 capabilities, 4.1.4.3 common cfg, 4.1.4.10 legacy).
ffi = cffi.FFI()
ffi.cdef("""
struct virtio_pci_cap {
    uint8_t cap_vndr; uint8_t cap_next; uint8_t cap_len; uint8_t cfg_type;
    uint8_t bar; uint8_t id; uint8_t padding[2]; uint32_t offset; uint32_t length;
};
struct virtio_pci_notify_cap { struct virtio_pci_cap cap; uint32_t notify_off_multiplier; };
struct virtio_pci_common_cfg {
    uint32_t device_feature_select; uint32_t device_feature;
    uint32_t driver_feature_select; uint32_t driver_feature;
    uint16_t config_msix_vector; uint16_t num_queues;
    uint8_t device_status; uint8_t config_generation;
    uint16_t queue_select; uint16_t queue_size; uint16_t queue_msix_vector;
    uint16_t queue_enable; uint16_t queue_notify_off;
    uint64_t queue_desc; uint64_t queue_driver; uint64_t queue_device;
};
struct virtio_pci_legacy {
    uint32_t host_features; uint32_t guest_features; uint32_t queue_pfn;
    uint16_t queue_size; uint16_t queue_select; uint16_t queue_notify;
    uint8_t status; uint8_t isr;
};
""")

VIRTIO_VENDOR = 0x1AF4
# Device status bits (2.1).
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK = 0x01, 0x02, 0x04, 0x08
DEVICE_NEEDS_RESET, FAILED = 0x40, 0x80
# Transport feature bits (6).
VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_VERSION_1 = 1 << 32
ISR_QUEUE, ISR_CONFIG = 0x1, 0x2
NO_VECTOR = 0xFFFF  # 4.1.5.1.2: no MSI-X vector (we have no MSI-X capability)

# Capability types (4.1.4) and where each structure lives in BAR4.
CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE = 1, 2, 3, 4
IDLE_POLL_NS = 200_000  # how long a queue that ran dry is polled before kicks are re-enabled
MODERN_BAR, MODERN_BAR_SIZE = 4, 0x4000
COMMON_OFF, ISR_OFF, DEVICE_OFF, NOTIFY_OFF = 0x0000, 0x1000, 0x2000, 0x3000
NOTIFY_MULTIPLIER = 4
LEGACY_BAR, LEGACY_CONFIG_OFF = 0, 0x14
CAP_START = 0x40
PCI_CAP_ID_VNDR = 0x09


class _Registers:
    """Byte-exact access to a register block described by a cdef struct, any width, by
    field name: reads only call the getters of fields they overlap (ISR read-clears)."""

    def __init__(self, ctype: str) -> None:
        self.size = ffi.sizeof(ctype)
        self.fields = [(name, f.offset, ffi.sizeof(f.type)) for name, f in ffi.typeof(ctype).fields]

    def read(self, offset: int, size: int, get: Callable[[str], int]) -> bytes:
        out = bytearray(size)
        for name, off, n in self.fields:
            lo, hi = max(off, offset), min(off + n, offset + size)
            if lo < hi:
                raw = (get(name) & ((1 << (8 * n)) - 1)).to_bytes(n, "little")
                out[lo - offset : hi - offset] = raw[lo - off : hi - off]
        return bytes(out)

    def write(self, offset: int, data: bytes, get: Callable[[str], int],
              setters: dict[str, Callable[[int], None]]) -> None:
        for name, off, n in self.fields:
            lo, hi = max(off, offset), min(off + n, offset + len(data))
            if lo < hi and name in setters:
                # A partial write (e.g. a 64-bit address as two dwords) merges with the rest.
                raw = bytearray(get(name).to_bytes(n, "little")) if hi - lo < n else bytearray(n)
                raw[lo - off : hi - off] = data[lo - offset : hi - offset]
                setters[name](int.from_bytes(raw, "little"))


COMMON = _Registers("struct virtio_pci_common_cfg")
LEGACY = _Registers("struct virtio_pci_legacy")


class VirtioPciFunction:
    """A transitional virtio-pci function. Subclasses provide:
      config_bytes() -> bytes            the device config space (read fresh each access)
      config_write(offset, data)         a driver write there (default: ignored)
      process_queue(index) -> bool       run a kicked queue; True while it has more work
      device_reset()                     forget device state on a reset (default: nothing)
    """

    def __init__(self, mem: GuestMemory, irq: Callable[[bool], None], *, virtio_type: int, pci_device: int,
                 class_code: int, features: int, num_queues: int, queue_max: int = DEFAULT_QUEUE_MAX,
                 irq_line: int = 0) -> None:
        self.mem = mem
        self.irq = irq
        self.clock: Callable[[], int] = time.monotonic_ns  # for the polling window; tests may replace it
        self.features = features | VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC
        self.queues = [Virtqueue(mem, queue_max) for _ in range(num_queues)]
        legacy_size = max(32, 1 << (LEGACY_CONFIG_OFF + len(self.config_bytes()) - 1).bit_length())
        self.pci = PciConfigHeader(
            VIRTIO_VENDOR, pci_device, class_code, revision=0,  # 4.1.2.1: transitional => revision 0
            bars=[BarSpec(legacy_size, io=True), None, None, None, BarSpec(MODERN_BAR_SIZE)],
            interrupt_pin=1, subsystem_vendor=VIRTIO_VENDOR, subsystem=virtio_type,
        )
        self.pci.space[0x3C] = irq_line
        self._write_capabilities()
        self.level = False
        self.error = ""  # why the device last went to DEVICE_NEEDS_RESET (for logs)
        self._reset_transport()

    # -- hooks for the device ----------------------------------------------------------
    def config_bytes(self) -> bytes:
        return b""

    def config_write(self, offset: int, data: bytes) -> None:
        """Device config is read-only unless the device says otherwise."""

    def process_queue(self, index: int) -> bool:
        return False

    def device_reset(self) -> None:
        """Nothing to forget by default."""

    # -- PCI configuration space --------------------------------------------------------
    def _write_capabilities(self) -> None:
        """Vendor capabilities (4.1.4) in config space; the header keeps them read-only."""
        caps = [(CAP_COMMON, COMMON_OFF, COMMON.size), (CAP_NOTIFY, NOTIFY_OFF, NOTIFY_MULTIPLIER * len(self.queues)),
                (CAP_ISR, ISR_OFF, 1), (CAP_DEVICE, DEVICE_OFF, max(1, len(self.config_bytes())))]
        pos = CAP_START
        for i, (cfg_type, offset, length) in enumerate(caps):
            ctype = "struct virtio_pci_notify_cap" if cfg_type == CAP_NOTIFY else "struct virtio_pci_cap"
            cap_len = ffi.sizeof(ctype)
            c = ffi.new(ctype + " *")
            base = c.cap if cfg_type == CAP_NOTIFY else c
            if cfg_type == CAP_NOTIFY:
                c.notify_off_multiplier = NOTIFY_MULTIPLIER
            base.cap_vndr, base.cap_len, base.cfg_type = PCI_CAP_ID_VNDR, cap_len, cfg_type
            base.bar, base.offset, base.length = MODERN_BAR, offset, length
            nxt = -(-(pos + cap_len) // 4) * 4
            base.cap_next = nxt if i + 1 < len(caps) else 0
            self.pci.space[pos : pos + cap_len] = bytes(ffi.buffer(c))
            pos = nxt
        self.pci.space[CAPABILITIES_PTR] = CAP_START
        self.pci.space[STATUS] |= STATUS_CAP_LIST

    def config(self, offset: int, size: int, is_write: bool, value: int) -> int:
        if is_write:
            self.pci.write(offset, size, value)
            return 0
        return self.pci.read(offset, size)

    # -- reset, status, features --------------------------------------------------------
    def _reset_transport(self) -> None:
        self.status = 0
        self.driver_features = 0
        self.device_feature_select = self.driver_feature_select = 0
        self.queue_select = 0
        self.isr = 0
        self.config_generation = 0
        self.legacy = False  # the driver uses the legacy BAR (no FEATURES_OK, no VERSION_1)
        for q in self.queues:
            q.reset()
        self.device_reset()
        self._update_irq()

    def reset(self) -> None:
        """Writing 0 to device status (2.1.2, 4.1.4.3.2): all state and queues back to start."""
        self.error = ""
        self._reset_transport()

    def _write_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self.reset()
            return
        if value & FEATURES_OK and not self.status & FEATURES_OK and not self._features_acceptable():
            value &= ~FEATURES_OK  # 3.1.1 step 6: the driver reads back and sees refusal
        self.status = value | (self.status & DEVICE_NEEDS_RESET)
        indirect = bool(self.driver_features & VIRTIO_F_INDIRECT_DESC)
        for q in self.queues:
            q.indirect = indirect

    def _features_acceptable(self) -> bool:
        if self.driver_features & ~self.features:
            return False
        return self.legacy or bool(self.driver_features & VIRTIO_F_VERSION_1)

    def _set_driver_window(self, select: int, value: int) -> None:
        if self.status & FEATURES_OK or select > 1:
            return  # 2.2.1: features are fixed once FEATURES_OK is set
        shift = 32 * select
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | ((value & 0xFFFFFFFF) << shift)

    def running(self) -> bool:
        if self.status & (DEVICE_NEEDS_RESET | FAILED) or not self.status & DRIVER_OK:
            return False
        return self.legacy or bool(self.status & FEATURES_OK)

    # -- interrupts ---------------------------------------------------------------------
    def _update_irq(self) -> None:
        level = self.isr != 0
        if level != self.level:
            self.level = level
            self.irq(level)

    def irq_level(self) -> bool:
        return self.level

    def _read_isr(self) -> int:
        value, self.isr = self.isr, 0  # 4.1.4.5.1: reading ISR resets it (and the line)
        self._update_irq()
        return value

    def config_changed(self) -> None:
        """The device changed its config space: bump the generation, tell the driver."""
        self.config_generation = (self.config_generation + 1) & 0xFF
        self.isr |= ISR_CONFIG
        self._update_irq()

    def fail(self, queue: Virtqueue | None, why: str) -> None:
        """A guest broke a rule: stop the queue, set DEVICE_NEEDS_RESET and send a config
        change notification (2.1.2); the driver must reset the device."""
        if queue is not None:
            queue.broken = True
            queue.kicked = False
        self.error = why
        self.status |= DEVICE_NEEDS_RESET
        self.config_changed()

    # -- queues -----------------------------------------------------------------------
    def _selected(self) -> Virtqueue | None:
        # Unsigned compare of the guest's u16 against our count (CVE-2011-2512).
        return self.queues[self.queue_select] if 0 <= self.queue_select < len(self.queues) else None

    def _enable_queue(self, q: Virtqueue, legacy_pfn: int | None = None) -> None:
        try:
            if legacy_pfn is None:
                q.enable()
            else:
                q.set_legacy_pfn(legacy_pfn)
        except VirtqueueError as e:
            self.fail(q, str(e))

    def notify(self, index: int) -> None:
        """A kick: mark only. The work happens in work(), outside the trapped access."""
        if 0 <= index < len(self.queues):
            self.queues[index].kicked = True

    def work_pending(self) -> bool:
        """A kicked queue, heads in flight, or a ring still being polled."""
        return self.running() and any(not q.broken and q.ready and (q.kicked or q.in_flight) for q in self.queues)

    def work(self) -> bool:
        """Run kicked queues, a bounded chunk each; raise the queue interrupt if any
        used entries were added and the driver did not suppress it (2.7.7)."""
        if not self.running():
            return False
        more = False
        for i, q in enumerate(self.queues):
            if q.broken or not q.ready or not (q.kicked or q.in_flight):
                continue
            before = q.used_idx
            try:
                q.suppress_notifications(True)
                q.kicked = self.process_queue(i)
                now = self.clock()
                if q.kicked:
                    q.idle_since = None
                elif q.idle_since is None or now - q.idle_since < IDLE_POLL_NS:
                    # Poll the avail ring a while longer with kicks still suppressed: a
                    # driver that refills as it reaps (qd > 1) then never traps to kick.
                    # The window is time, not rounds: a round's cost varies.
                    q.idle_since = now if q.idle_since is None else q.idle_since
                    q.kicked = True
                else:
                    # Going idle: allow kicks again, then look once more, for a request
                    # the driver queued while it was told not to kick (2.7.10).
                    q.idle_since = None
                    q.suppress_notifications(False)
                    self.mem.fence()  # the flag store must be seen before we load avail idx
                    q.kicked = q.pending() > 0
                if q.used_idx != before:
                    # The used idx store must be seen before we load the driver's flag, or a
                    # driver that enabled interrupts just then and saw no completion sleeps
                    # with no interrupt coming (2.7.7).
                    self.mem.fence()
                    if q.wants_interrupt():
                        self.isr |= ISR_QUEUE
            except (VirtqueueError, GuestMemoryError) as e:
                self.fail(q, f"queue {i}: {e}")
                continue
            more = more or q.kicked
        self._update_irq()
        return more and self.running()

    # -- BAR accesses -----------------------------------------------------------------
    def bar_access(self, bar: int, offset: int, size: int, is_write: bool, data: bytes) -> bytes:
        data = bytes(data[:size]).ljust(size, b"\0") if is_write else b""
        if bar == LEGACY_BAR:
            return self._legacy(offset, size, is_write, data)
        if bar != MODERN_BAR:
            return b"" if is_write else b"\xff" * size
        if COMMON_OFF <= offset < COMMON_OFF + COMMON.size:
            if is_write:
                COMMON.write(offset - COMMON_OFF, data, self._common_get, self._common_setters())
                return b""
            return COMMON.read(offset - COMMON_OFF, size, self._common_get)
        if ISR_OFF <= offset < ISR_OFF + 4:
            return b"" if is_write else self._read_isr().to_bytes(1, "little").ljust(size, b"\0")
        if DEVICE_OFF <= offset < NOTIFY_OFF:
            return self._device_cfg(offset - DEVICE_OFF, size, is_write, data)
        if NOTIFY_OFF <= offset < MODERN_BAR_SIZE:
            if is_write:
                self.notify((offset - NOTIFY_OFF) // NOTIFY_MULTIPLIER)
            return b"" if is_write else bytes(size)
        return b"" if is_write else bytes(size)

    def _device_cfg(self, offset: int, size: int, is_write: bool, data: bytes) -> bytes:
        if is_write:
            self.config_write(offset, data)
            return b""
        return self.config_bytes()[offset : offset + size].ljust(size, b"\0")

    def _common_get(self, name: str) -> int:
        q = self._selected()
        if name == "device_feature":
            return (self.features >> (32 * self.device_feature_select)) if self.device_feature_select < 2 else 0
        if name == "driver_feature":
            return (self.driver_features >> (32 * self.driver_feature_select)) if self.driver_feature_select < 2 else 0
        if name in ("config_msix_vector", "queue_msix_vector"):
            return NO_VECTOR
        if name == "num_queues":
            return len(self.queues)
        if name == "device_status":
            return self.status
        if name in ("device_feature_select", "driver_feature_select", "queue_select", "config_generation"):
            return getattr(self, name)
        if q is None:
            return 0  # 4.1.4.3.2: queue_size 0 means the queue is unavailable
        return {"queue_size": q.size, "queue_enable": int(q.ready), "queue_notify_off": self.queue_select,
                "queue_desc": q.desc_addr, "queue_driver": q.avail_addr, "queue_device": q.used_addr}.get(name, 0)

    def _common_setters(self) -> dict[str, Callable[[int], None]]:
        def queue_field(attr: str) -> Callable[[int], None]:
            def put(v: int) -> None:
                q = self._selected()
                if q is not None and not q.ready:  # 4.1.4.3.2: no changes once enabled
                    setattr(q, attr, v)
            return put

        def queue_size(v: int) -> None:
            q = self._selected()
            if q is not None and not q.ready:
                q.set_size(v)

        def queue_enable(v: int) -> None:
            q = self._selected()
            if q is not None and v == 1 and not q.ready:
                self._enable_queue(q)

        return {
            "device_feature_select": lambda v: setattr(self, "device_feature_select", v),
            "driver_feature_select": lambda v: setattr(self, "driver_feature_select", v),
            "driver_feature": lambda v: self._set_driver_window(self.driver_feature_select, v),
            "config_msix_vector": lambda v: None, "queue_msix_vector": lambda v: None,
            "device_status": self._write_status,
            "queue_select": lambda v: setattr(self, "queue_select", v),
            "queue_size": queue_size, "queue_enable": queue_enable,
            "queue_desc": queue_field("desc_addr"), "queue_driver": queue_field("avail_addr"),
            "queue_device": queue_field("used_addr"),
        }

    def _legacy(self, offset: int, size: int, is_write: bool, data: bytes) -> bytes:
        if offset >= LEGACY_CONFIG_OFF:
            return self._device_cfg(offset - LEGACY_CONFIG_OFF, size, is_write, data)
        if is_write:
            LEGACY.write(offset, data, self._legacy_get, self._legacy_setters())
            return b""
        return LEGACY.read(offset, size, self._legacy_get)

    def _legacy_get(self, name: str) -> int:
        q = self._selected()
        if name == "host_features":
            return self.features & 0xFFFFFFFF  # legacy sees only bits 0-31 (no VERSION_1)
        if name == "guest_features":
            return self.driver_features & 0xFFFFFFFF
        if name == "queue_pfn":
            return q.desc_addr >> 12 if q is not None and q.ready else 0
        if name == "queue_size":
            return q.max_size if q is not None else 0
        if name == "queue_select":
            return self.queue_select
        if name == "status":
            return self.status
        if name == "isr":
            return self._read_isr()
        return 0

    def _legacy_setters(self) -> dict[str, Callable[[int], None]]:
        def guest_features(v: int) -> None:
            self.legacy = True
            self._set_driver_window(0, v)

        def queue_pfn(v: int) -> None:
            self.legacy = True
            q = self._selected()
            if q is None:
                return
            if v == 0:
                q.reset()  # legacy: PFN 0 disables the queue
            elif not q.ready:
                self._enable_queue(q, legacy_pfn=v)

        return {"guest_features": guest_features, "queue_pfn": queue_pfn,
                "queue_select": lambda v: setattr(self, "queue_select", v),
                "queue_notify": self.notify, "status": self._write_status}

    # -- state --------------------------------------------------------------------------
    def device_snapshot(self) -> dict:
        return {}

    def device_restore(self, state: dict) -> None:
        """Nothing beyond the transport by default."""

    def snapshot(self) -> dict:
        return {
            "pci": self.pci.snapshot(), "status": self.status, "driver_features": self.driver_features,
            "dfs": self.device_feature_select, "drs": self.driver_feature_select, "qsel": self.queue_select,
            "isr": self.isr, "level": self.level, "gen": self.config_generation, "legacy": self.legacy,
            "error": self.error[:200], "queues": [q.snapshot() for q in self.queues], "device": self.device_snapshot(),
        }

    def restore(self, s: dict) -> None:
        """Take a snapshot back in a new process, then reconcile each queue with guest RAM
        (Virtqueue.reconcile) and re-arm every ready queue, so kicks and in-flight heads
        the dead process had not finished are served by the next work() calls."""
        self.pci.restore(s["pci"])
        self.status, self.driver_features = s["status"], s["driver_features"]
        self.device_feature_select, self.driver_feature_select = s["dfs"], s["drs"]
        self.queue_select, self.isr, self.level = s["qsel"], s["isr"], s["level"]
        self.config_generation, self.legacy, self.error = s["gen"], s["legacy"], s["error"]
        for q, qs in zip(self.queues, s["queues"], strict=True):
            q.restore(qs)
        self.device_restore(s["device"])
        for i, q in enumerate(self.queues):
            try:
                if q.reconcile():
                    self.isr |= ISR_QUEUE  # the dead process may not have raised it
            except (VirtqueueError, GuestMemoryError) as e:
                self.fail(q, f"queue {i} on restore: {e}")
                continue
            if q.ready and not q.broken:
                q.kicked = True
        self._update_irq()
