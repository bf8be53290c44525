"""BlockImage and the -drive cache= modes, on real files: bytes on disk, the O_DIRECT flag,
and whether the host page cache holds the image afterwards (mincore(2))."""

from __future__ import annotations

import fcntl
import mmap
import os

import pytest

from backends.block import CACHE_MODES, BlockImage, probe_alignment
from backends.block import cached_pages as block_cached_pages

MiB = 1 << 20


class CountingImage(BlockImage):
    """A real image that counts its flushes (fdatasync)."""

    def __init__(self, fd: int, cache: str = "writeback") -> None:
        super().__init__(fd, cache=cache)
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def cached_pages(path) -> int:
    return block_cached_pages(path)[0]


def evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(2 * MiB))
    return p


def open_image(path, cache: str) -> BlockImage:
    flags = os.O_RDWR | (os.O_DIRECT if cache in ("none", "directsync") else 0)
    flags |= os.O_DSYNC if cache in ("writethrough", "directsync") else 0
    return BlockImage(os.open(path, flags), cache=cache)


def aligned(n: int) -> tuple[mmap.mmap, memoryview]:
    m = mmap.mmap(-1, n)
    return m, memoryview(m)


@pytest.mark.parametrize("cache", CACHE_MODES)
def test_every_mode_reads_and_writes_the_bytes(image, cache):
    want = image.read_bytes()
    img = open_image(image, cache)
    try:
        m, buf = aligned(64 * 1024)
        img.read_into(4096, [buf])
        assert bytes(buf) == want[4096 : 4096 + 65536]
        buf[:] = os.urandom(65536)
        img.write_from(MiB, [buf[:32768], buf[32768:]])
        img.flush()
        assert image.read_bytes()[MiB : MiB + 65536] == bytes(buf)
        buf.release()
        m.close()
    finally:
        os.close(img.fd)


def test_cache_none_bypasses_the_host_page_cache(image):
    want = image.read_bytes()
    evict(image)
    assert cached_pages(image) == 0
    img = open_image(image, "none")
    try:
        assert img.align == probe_alignment(img.fd) and img.align in (512, 1024, 2048, 4096)
        m, buf = aligned(2 * MiB)
        img.read_into(0, [buf])
        assert bytes(buf) == want
        buf[:] = bytes(reversed(want))
        img.write_from(0, [buf])
        img.flush()
        assert cached_pages(image) == 0  # neither the reads nor the writes went through it
        buf.release()
        m.close()
    finally:
        os.close(img.fd)
    assert image.read_bytes() == bytes(reversed(want))


def test_cache_writeback_fills_the_page_cache(image):
    evict(image)
    img = open_image(image, "writeback")
    try:
        img.read_into(0, [memoryview(bytearray(2 * MiB))])
        assert cached_pages(image) == 2 * MiB // mmap.PAGESIZE
    finally:
        os.close(img.fd)


def test_cache_none_takes_misaligned_buffers_and_keeps_o_direct(image):
    """A buffer at an odd address (a PIO sector staged in a bytes object) goes through the
    page cache for that transfer; the descriptor is O_DIRECT again afterwards."""
    want = image.read_bytes()
    img = open_image(image, "none")
    try:
        raw = bytearray(4096 + 1)
        view = memoryview(raw)[1:]
        assert not img.direct_ok(0, [view])
        img.read_into(8192, [view])
        assert bytes(view) == want[8192 : 8192 + 4096]
        img.write_from(512, [memoryview(b"\x5a" * 512)])
        img.flush()
        assert fcntl.fcntl(img.fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(img.fd)
    assert image.read_bytes()[512:1024] == b"\x5a" * 512


def test_cache_none_range_smaller_than_the_host_block(image):
    """A host with 4 KiB blocks and a guest with 512-byte sectors: a one-sector write at a
    sector that is not block-aligned still lands exactly there."""
    want = bytearray(image.read_bytes())
    img = open_image(image, "none")
    try:
        img.align = 4096  # as probed on a 4Kn device
        m, buf = aligned(4096)
        sector = buf[:512]
        sector[:] = b"\xa5" * 512
        assert not img.direct_ok(3 * 512, [sector])
        img.write_from(3 * 512, [sector])
        img.read_into(4096, [buf])  # aligned: direct
        assert bytes(buf) == bytes(want[4096:8192])
        sector.release()
        buf.release()
        m.close()
    finally:
        os.close(img.fd)
    want[1536:2048] = b"\xa5" * 512
    assert image.read_bytes() == bytes(want)


def test_a_restarted_backend_finds_o_direct_even_if_its_predecessor_died_without_it(image):
    img = open_image(image, "none")
    try:
        flags = fcntl.fcntl(img.fd, fcntl.F_GETFL)
        fcntl.fcntl(img.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)  # died mid-fallback
        again = BlockImage(img.fd, cache="none")
        assert fcntl.fcntl(again.fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(img.fd)


def test_unsafe_ignores_flush_and_the_others_fdatasync(image, monkeypatch):
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    for cache in CACHE_MODES:
        img = open_image(image, cache)
        try:
            img.flush()
        finally:
            os.close(img.fd)
        assert bool(synced) == (cache != "unsafe"), cache
        synced.clear()
