"""A raw disk image as device models see it: reads and writes straight to and from
memoryviews of guest RAM (preadv/pwritev, no copy), and flush (fdatasync).

The image is opened and locked by the broker before the guest starts (see
broker/drives.py); a backend process gets its descriptor.
"""

from __future__ import annotations

import os
from collections.abc import Callable

SECTOR = 512


class BlockImageError(OSError):
    pass


class BlockImage:
    def __init__(self, fd: int, readonly: bool = False, sector_size: int = SECTOR) -> None:
        self.fd = fd
        self.readonly = readonly
        self.sector_size = sector_size
        self.size = os.fstat(fd).st_size

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
        done = 0
        while done < total:  # a short transfer resumes where it stopped
            n = op(self.fd, _skip(buffers, done), offset + done)
            if n <= 0:
                raise BlockImageError(f"short {what} at {offset + done}")
            done += n
        return total

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(offset, [memoryview(buf)])
        return bytes(buf)

    def write(self, offset: int, data: bytes) -> None:
        self.write_from(offset, [memoryview(data)])

    def flush(self) -> None:
        os.fdatasync(self.fd)


def _skip(buffers: list[memoryview], n: int) -> list[memoryview]:
    out = []
    for b in buffers:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(b[n:] if n else b)
        n = 0
    return out
