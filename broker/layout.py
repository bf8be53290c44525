"""Shared-memory layouts, declared once (DESIGN.md "Shared memory").

io_page:      the I/O sharing page of one backend: one request slot per vCPU, the
              backend's PCI BAR table (read by the vcpu to route BAR accesses) and its
              counters.
state_region: what must outlive a backend process: two model-state buffers published
              by one aligned 8-byte store, plus the staged-output and input rings that
              the supervisor drains and fills.
"""

from __future__ import annotations

import mmap
import os

from cffi import FFI

MAX_VCPUS = 16
SLOT_DATA = 4096  # one page: the most a string I/O exit carries (kvm_run data page)
STATE_MODEL_BYTES = 65536
OUT_RING = 65536
IN_RING = 4096

ffi = FFI()
ffi.cdef(
    f"""
    struct io_slot {{
        uint64_t seq;        /* bumped by the vcpu for every post */
        uint32_t state;      /* SLOT_FREE, SLOT_POSTED, SLOT_DONE */
        uint32_t kind;       /* KIND_PIO, KIND_MMIO, KIND_PCI_CFG */
        uint32_t is_write;
        uint32_t size;       /* bytes per access: 1, 2, 4 (8 for MMIO) */
        uint64_t addr;       /* port, GPA offset in BAR, or BDF<<12 | config register */
        uint32_t count;      /* string I/O repetitions */
        uint32_t vcpu_asleep;/* the vcpu sleeps on its completion socket: send one */
        uint32_t bar;        /* which BAR, or NO_BAR for a fixed ISA port */
        uint32_t failed;     /* completed by the vcpu with all-ones: backend failed */
        uint64_t t_exit, t_post, t_backend, t_done;  /* CLOCK_MONOTONIC ns, for -trace */
        uint8_t data[{SLOT_DATA}];
    }};
    struct io_bar {{
        uint64_t addr;
        uint64_t size;
        uint32_t kind;       /* BAR_NONE, BAR_IO, BAR_MEM */
        uint32_t enabled;    /* command register decodes it */
    }};
    struct io_page {{
        uint32_t magic;
        uint32_t nslots;
        uint32_t backend_asleep;   /* the backend sleeps on its doorbell: ring it */
        uint32_t failed;           /* supervisor gave up: complete with all-ones */
        uint64_t served;           /* requests served (backend) */
        uint64_t timeouts;         /* posts completed with all-ones (vcpu) */
        uint64_t bar_generation;   /* bumped by the backend when its BARs change */
        struct io_bar bars[6];
        uint8_t pci_config[256];   /* mirror of the device's config space, for info pci */
        uint32_t pci_bdf;          /* bus<<8 | dev<<3 | fn, or 0xFFFFFFFF: not PCI */
        uint32_t irq;              /* ISA IRQ or interrupt line in use */
        uint32_t irq_lines;        /* bitmask of the ISA lines it asserts: the truth; messages only wake */
        struct io_slot slots[{MAX_VCPUS}];
    }};
    struct state_buffer {{
        uint64_t last_seq[{MAX_VCPUS}];   /* per slot: the newest request applied */
        uint64_t out_head;       /* staged output produced */
        uint64_t in_tail;        /* input consumed */
        uint32_t model_len;
        uint32_t pad;
        uint8_t model[{STATE_MODEL_BYTES}];
    }};
    struct state_region {{
        uint64_t generation;     /* low bit selects the active buffer */
        uint64_t out_tail;       /* staged output drained (supervisor) */
        uint64_t in_head;        /* input produced (supervisor) */
        uint32_t out_notify;     /* supervisor asleep: message it when out_head moves */
        uint32_t pad;
        struct state_buffer buf[2];
        uint8_t out_ring[{OUT_RING}];
        uint8_t in_ring[{IN_RING}];
    }};
    """
)

IO_PAGE_MAGIC = 0x53505650  # 'PVPS'
SLOT_FREE, SLOT_POSTED, SLOT_DONE = 0, 1, 2
KIND_PIO, KIND_MMIO, KIND_PCI_CFG = 0, 1, 2
KIND_NAMES = {KIND_PIO: "pio", KIND_MMIO: "mmio", KIND_PCI_CFG: "pci-cfg"}
BAR_NONE, BAR_IO, BAR_MEM = 0, 1, 2
NO_BAR = 0xFF  # io_slot.bar of an access to a fixed ISA port, not to a BAR

IO_PAGE_SIZE = ffi.sizeof("struct io_page")
STATE_REGION_SIZE = ffi.sizeof("struct state_region")
assert ffi.offsetof("struct io_slot", "data") % 8 == 0
assert ffi.offsetof("struct state_region", "buf") % 8 == 0


def create_region_fd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


class Mapped:
    """A shared-memory layout mapped from a memfd, viewed as a cffi struct."""

    def __init__(self, fd: int, ctype: str) -> None:
        size = ffi.sizeof(ctype)
        self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.ptr = ffi.cast(ctype + " *", ffi.from_buffer(self.map))

    def close(self) -> None:
        self.ptr = None
        try:
            self.map.close()
        except BufferError:
            pass


def map_io_page(fd: int) -> Mapped:
    return Mapped(fd, "struct io_page")


def map_state_region(fd: int) -> Mapped:
    return Mapped(fd, "struct state_region")


def init_io_page(fd: int, nslots: int) -> None:
    m = map_io_page(fd)
    m.ptr.magic = IO_PAGE_MAGIC
    m.ptr.nslots = nslots
    m.close()
