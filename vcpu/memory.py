"""Guest RAM: one memfd mapped MAP_SHARED, seen live by the vcpu and DMA backends."""

from __future__ import annotations

import ctypes
import mmap
import os

MiB = 1 << 20
GiB = 1 << 30

# Fixed guest-physical layout used by the vcpu's long-mode setup (DESIGN.md).
PML4_GPA = 0x1000
PDPT_GPA = 0x2000
PD_GPA = 0x3000  # one page per GiB mapped, up to MAX_MAPPED_GIB
MAX_MAPPED_GIB = 16
STACK_TOP = 0x80000
STACK_PER_VCPU = 0x8000
FIRMWARE_BASE = 0x100000
PCI_MMIO_BASE = 0xE0000000
PCI_MMIO_END = 0x1_0000_0000


_libc = ctypes.CDLL(None)
_fence_word = ctypes.c_int(0)


def fence() -> None:
    """A full memory barrier (a locked xchg inside pthread_spin_trylock on x86-64).

    Python has no fence of its own, and x86 lets a load pass an earlier store. The
    "store my flag, then load the peer's" handshakes (virtio 2.7.10 notification
    suppression, the sharing page's asleep flags) need one between the two.
    """
    if _libc.pthread_spin_trylock(ctypes.byref(_fence_word)) == 0:
        _libc.pthread_spin_unlock(ctypes.byref(_fence_word))


class GuestMemoryError(ValueError):
    """An access outside guest RAM."""


def create_ram_fd(size: int, name: str = "splitvm-ram") -> int:
    """A memfd of `size` bytes; the supervisor creates it and hands it to children."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


class GuestMemory:
    """Guest RAM at GPA 0, mapped from a memfd. Every access is bounds-checked."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.map)

    def check(self, gpa: int, length: int) -> None:
        # Overflow-safe: Python ints do not wrap, but negative values must be refused.
        if gpa < 0 or length < 0 or gpa + length > self.size:
            raise GuestMemoryError(f"GPA range 0x{gpa:x}+0x{length:x} outside guest RAM")

    def slice(self, gpa: int, length: int) -> memoryview:
        self.check(gpa, length)
        return self.view[gpa : gpa + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.slice(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        self.slice(gpa, len(data))[:] = data

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.slice(gpa, 4), "little")

    def write_u64(self, gpa: int, value: int) -> None:
        self.slice(gpa, 8)[:] = value.to_bytes(8, "little")

    def fence(self) -> None:
        fence()

    def address(self) -> int:
        """Host virtual address of the mapping (for KVM memslots and unicorn)."""
        return ctypes.addressof(ctypes.c_char.from_buffer(self.map))

    def close(self) -> None:
        self.view.release()
        try:
            self.map.close()
        except BufferError:
            pass


def build_identity_map(mem: GuestMemory) -> int:
    """Identity-map max(RAM, 4 GiB) with 2 MiB pages (Present|Writable|User|PS).

    User bit on every level: the firmware runs at CPL 3 (DESIGN.md, "Facts").
    Returns CR3.
    """
    present_rw_user = 0x7
    page_size = 0x80
    gib = max(4, -(-mem.size // GiB))
    if gib > MAX_MAPPED_GIB:
        raise GuestMemoryError(f"at most {MAX_MAPPED_GIB} GiB can be mapped")
    mem.write(PML4_GPA, bytes(0x1000 * (2 + gib)))
    mem.write_u64(PML4_GPA, PDPT_GPA | present_rw_user)
    for g in range(gib):
        pd = PD_GPA + g * 0x1000
        mem.write_u64(PDPT_GPA + g * 8, pd | present_rw_user)
        entries = bytearray()
        for i in range(512):
            entries += ((g * GiB + i * 2 * MiB) | present_rw_user | page_size).to_bytes(8, "little")
        mem.write(pd, bytes(entries))
    return PML4_GPA
