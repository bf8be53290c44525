"""Guest firmware block drivers under QEMU: PIIX3 IDE (DMA), ATAPI and virtio-blk.

Boots the firmware with an IDE disk (hda), a virtio-blk disk (vda) and a
CD-ROM (hdc), then checks the shell's lsblk / sha256sum / dd / bench disk
against the host's view of the image files.  Input is sent one line at a
time after each prompt, as in test_firmware_qemu.py.  conftest.py wants no
child process to outlive a test, so every test boots its own QEMU (about a
second) on fresh images.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from qemuutil import QEMU, QemuConsole, qemu_cmd

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "splitvm> "
BOOT_TIMEOUT = 120.0
COMMAND_TIMEOUT = 180.0  # TCG is slow; bench and whole-disk hashes take a while

DISK_SIZE = 4 * 1024 * 1024
CD_SIZE = 1024 * 1024

pytestmark = [
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed (apt-get install qemu-system-x86)"),
    pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed (apt-get install gcc)"),
]


@pytest.fixture(scope="module")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    build = importlib.import_module("vcpu.guest.build").build
    return build(tmp_path_factory.mktemp("firmware"))


@pytest.fixture
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("disks")
    paths = {"hda": d / "a.img", "vda": d / "b.img", "hdc": d / "c.iso"}
    paths["hda"].write_bytes(os.urandom(DISK_SIZE))
    paths["vda"].write_bytes(os.urandom(DISK_SIZE))
    paths["hdc"].write_bytes(os.urandom(CD_SIZE))  # any multiple of 2048 will do
    return paths


@pytest.fixture
def console(firmware: Path, images: dict[str, Path]):
    cmd = qemu_cmd(
        firmware,
        "-drive", f"file={images['hda']},if=ide,index=0,format=raw",
        "-drive", f"file={images['vda']},if=virtio,format=raw",
        "-cdrom", str(images["hdc"]),
    )  # fmt: skip
    con = QemuConsole(cmd)
    try:
        con.wait_for_prompts(1, BOOT_TIMEOUT)
        yield con
    finally:
        con.close()


def sha256(path: Path, nbytes: int | None = None) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data if nbytes is None else data[:nbytes]).hexdigest()


BENCH_RE = re.compile(
    r"bench disk (\w+) mode=(read|write|randread) bs=(\d+) size=(\d+) qd=(\d+) "
    r"MBps=\d+\.\d iops=\d+ lat_median_us=\d+ lat_p99_us=\d+"
)


def test_sha256_selftest(console: QemuConsole) -> None:
    assert console.command("sha256sum --selftest") == ["sha256: selftest OK"]


def test_lsblk(console: QemuConsole) -> None:
    assert console.command("lsblk") == [
        f"hda {DISK_SIZE} disk ide-dma",
        f"hdc {CD_SIZE} cdrom atapi ro",
        f"vda {DISK_SIZE} disk virtio-blk",
    ]


@pytest.mark.parametrize("dev", ["hda", "vda", "hdc"])
def test_sha256sum_matches_host(console: QemuConsole, images: dict[str, Path], dev: str) -> None:
    assert console.command(f"sha256sum {dev}") == [f"{sha256(images[dev])}  {dev}"]


def test_sha256sum_prefix(console: QemuConsole, images: dict[str, Path]) -> None:
    # 1000 bytes: not a sector multiple, exercises the partial last chunk.
    assert console.command("sha256sum hdc 1000") == [f"{sha256(images['hdc'], 1000)}  hdc"]


def test_dd_hda_to_vda(console: QemuConsole, images: dict[str, Path]) -> None:
    assert console.command("dd if=hda of=vda bs=4096 count=256") == [
        "256+0 records in",
        "256+0 records out",
    ]
    n = 256 * 4096
    assert images["vda"].read_bytes()[:n] == images["hda"].read_bytes()[:n]
    assert console.command(f"sha256sum vda {n}") == [f"{sha256(images['hda'], n)}  vda"]


def test_dd_skip_seek_pio_sized(console: QemuConsole, images: dict[str, Path]) -> None:
    # cdrom -> disk with skip/seek; 64 KiB requests cross PRD 64 KiB pieces.
    assert console.command("dd if=hdc of=hda bs=65536 skip=2 seek=3 count=4") == [
        "4+0 records in",
        "4+0 records out",
    ]
    cd = images["hdc"].read_bytes()
    assert images["hda"].read_bytes()[3 * 65536 : 7 * 65536] == cd[2 * 65536 : 6 * 65536]


def test_dd_to_cdrom_fails(console: QemuConsole) -> None:
    assert console.command("dd if=hda of=hdc bs=2048 count=1") == [
        "dd: failed to open 'hdc': Read-only file system"
    ]


def test_dd_unknown_device(console: QemuConsole) -> None:
    assert console.command("dd if=nope of=vda") == ["dd: failed to open 'nope': No such file or directory"]


@pytest.mark.parametrize("dev,qd", [("vda", 8), ("hda", 1)])
def test_bench_disk_read(console: QemuConsole, dev: str, qd: int) -> None:
    out = console.command(f"bench disk {dev} read bs=65536 size=1M qd={qd}")
    assert len(out) == 2, out
    m = BENCH_RE.fullmatch(out[0])
    assert m and m.groups() == (dev, "read", "65536", str(1 << 20), str(qd)), out[0]
    m = BENCH_RE.fullmatch(out[1])
    assert m and m.group(1, 2, 3, 5) == (dev, "randread", "4096", str(qd)), out[1]


def test_bench_disk_write_pattern(console: QemuConsole, images: dict[str, Path]) -> None:
    out = console.command("bench disk vda write bs=4096 size=64K qd=4")
    assert len(out) == 1 and BENCH_RE.fullmatch(out[0]), out
    data = images["vda"].read_bytes()
    for off in range(0, 65536, 512):
        assert data[off : off + 8] == b"SPVMBNCH"
        assert int.from_bytes(data[off + 8 : off + 16], "little") == off


def test_bench_disk_write_readonly(console: QemuConsole) -> None:
    assert console.command("bench disk hdc write") == ["bench disk: hdc: Read-only file system"]
