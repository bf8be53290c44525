"""A raw disk image as device models see it: reads and writes straight to and from
memoryviews of guest RAM (preadv/pwritev, no copy), and flush (fdatasync).

The image is opened and locked by the broker before the guest starts (see
broker/drives.py); a backend process gets its descriptor. The -drive cache= mode
(QEMU's spellings and meanings) decides how:

  cache=        host page cache       a write is complete when    guest FLUSH
  writeback     used                  in the page cache           fdatasync
  none          bypassed (O_DIRECT)   handed to the device        fdatasync
  writethrough  used (O_DSYNC)        on stable storage           fdatasync
  directsync    bypassed (both)       on stable storage           fdatasync
  unsafe        used                  in the page cache           ignored

O_DIRECT needs the file offset, the length and every buffer's address aligned to the
file system's block (probed at start, as QEMU's raw_probe_alignment does). A request
that is not (a guest buffer at an odd address, a PIO sector staged in a bytes object)
goes through the page cache: O_DIRECT is turned off on the descriptor for that one
transfer (fcntl F_SETFL). Linux keeps the two coherent: a direct read first writes back
dirty cached pages of its range, a direct write drops them.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from collections.abc import Callable

import cffi

SECTOR = 512
CACHE_MODES = ("writeback", "none", "writethrough", "directsync", "unsafe")
DIRECT_MODES = ("none", "directsync")
PROBE_SIZES = (512, 1024, 2048, 4096)

_ffi = cffi.FFI()
_libc = ctypes.CDLL(None, use_errno=True)


class BlockImageError(OSError):
    pass


class BlockImage:
    def __init__(self, fd: int, readonly: bool = False, sector_size: int = SECTOR, cache: str = "writeback") -> None:
        if cache not in CACHE_MODES:
            raise ValueError(f"unknown cache mode {cache!r}")
        self.fd = fd
        self.readonly = readonly
        self.sector_size = sector_size
        self.cache = cache
        self.size = os.fstat(fd).st_size
        self.align = 1
        if cache in DIRECT_MODES:
            # A process that died inside a buffered fallback left O_DIRECT off: put it back.
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
            self.align = probe_alignment(fd)

    @property
    def write_through(self) -> bool:
        """Is every completed write already on stable storage (O_DSYNC: writethrough, directsync)?
        A device then has no volatile write cache to report or flush."""
        return self.cache in ("writethrough", "directsync")

    @property
    def sectors(self) -> int:
        return self.size // self.sector_size

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise BlockImageError(f"image range {offset}+{length} outside {self.size} bytes")

    def read_into(self, offset: int, buffers: list[memoryview]) -> int:
        """Fill `buffers` (e.g. slices of guest RAM) from the image at `offset`."""
        return self._transfer(os.preadv, "read", offset, buffers)

    def write_from(self, offset: int, buffers: list[memoryview]) -> int:
        """Write `buffers` to the image at `offset` (idempotent: replay writes the same)."""
        if self.readonly:
            raise BlockImageError("image is read-only")
        return self._transfer(os.pwritev, "write", offset, buffers)

    def _transfer(self, op: Callable, what: str, offset: int, buffers: list[memoryview]) -> int:
        total = sum(len(b) for b in buffers)
        self._check(offset, total)
        if self.align == 1 or self.direct_ok(offset, buffers):
            return self._all(op, what, offset, buffers, total)
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)  # this one transfer goes buffered
        try:
            return self._all(op, what, offset, buffers, total)
        finally:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags)

    def _all(self, op: Callable, what: str, offset: int, buffers: list[memoryview], total: int) -> int:
        done = 0
        while done < total:  # a short transfer resumes where it stopped
            n = op(self.fd, _skip(buffers, done), offset + done)
            if n <= 0:
                raise BlockImageError(f"short {what} at {offset + done}")
            done += n
        return total

    def direct_ok(self, offset: int, buffers: list[memoryview]) -> bool:
        """Can this transfer go to O_DIRECT as it is (offset, lengths, addresses aligned)?"""
        a = self.align
        return offset % a == 0 and all(len(b) % a == 0 and _address(b) % a == 0 for b in buffers)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(offset, [memoryview(buf)])
        return bytes(buf)

    def write(self, offset: int, data: bytes) -> None:
        self.write_from(offset, [memoryview(data)])

    def flush(self) -> None:
        if self.cache != "unsafe":  # cache=unsafe: QEMU's cache.no-flush=on
            os.fdatasync(self.fd)


def probe_alignment(fd: int) -> int:
    """The smallest block O_DIRECT accepts on this file, for offsets, lengths and buffer
    addresses alike: the first size whose read at offset 0, into a buffer aligned to that
    size and no more, is not refused with EINVAL."""
    with mmap.mmap(-1, 2 * max(PROBE_SIZES)) as page:
        for size in PROBE_SIZES:
            with memoryview(page)[size : 2 * size] as buf:  # aligned to size, not to 2*size
                try:
                    os.preadv(fd, [buf], 0)
                except OSError as e:
                    if e.errno == errno.EINVAL:
                        continue
                    raise
            return size
    raise BlockImageError(f"O_DIRECT refuses every alignment up to {max(PROBE_SIZES)} bytes")


def cached_pages(path: str | os.PathLike) -> tuple[int, int]:
    """(pages of the file in the host page cache, pages of the file), by mincore(2) on a
    read-only mapping: what cache=none promises to leave alone, and what the disk
    benchmark reports, since "in the page cache" is a claim about the host."""
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    if size == 0:
        return 0, 0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
        vec = (ctypes.c_ubyte * pages)()
        buf = _ffi.from_buffer(m)
        try:
            if _libc.mincore(ctypes.c_void_p(int(_ffi.cast("uintptr_t", buf))), ctypes.c_size_t(size), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            _ffi.release(buf)
    return sum(v & 1 for v in vec), pages


def _address(buf: memoryview) -> int:
    return int(_ffi.cast("uintptr_t", _ffi.from_buffer(buf)))


def _skip(buffers: list[memoryview], n: int) -> list[memoryview]:
    out = []
    for b in buffers:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(b[n:] if n else b)
        n = 0
    return out
