"""Boot the guest firmware under QEMU (multiboot path) and drive its shell.

QEMU's 16550 buffers at most 16 input bytes and the firmware clears the FIFO
when it initialises the UART, so input is sent one line at a time, each only
after the prompt for it has appeared.
"""

from __future__ import annotations

import importlib
import shutil
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
from qemuutil import QEMU, QemuConsole, qemu_cmd

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "splitvm> "
BOOT_TIMEOUT = 60.0
COMMAND_TIMEOUT = 30.0

needs_qemu = pytest.mark.skipif(
    QEMU is None,
    reason="qemu-system-x86_64 not installed (apt-get install qemu-system-x86)",
)


def _build_module() -> ModuleType:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module("vcpu.guest.build")


@pytest.fixture(scope="session")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed (apt-get install gcc)")
    return _build_module().build(tmp_path_factory.mktemp("firmware"))


@contextmanager
def _boot(firmware: Path, append: str | None = None) -> Iterator[QemuConsole]:
    console = QemuConsole(qemu_cmd(firmware, "-device", "e1000", *(["-append", append] if append else [])))
    # Boot commands are echoed after a prompt too; wait for the interactive one.
    boot_commands = [c for c in (append or "").split(";") if c.strip()]
    try:
        console.wait_for_prompts(len(boot_commands) + 1, BOOT_TIMEOUT)
        yield console
    finally:
        console.close()


def test_build_is_cached_and_multiboot(tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed (apt-get install gcc)")
    build = _build_module().build
    elf = build(tmp_path)
    mtime = elf.stat().st_mtime_ns
    assert build(tmp_path) == elf
    assert elf.stat().st_mtime_ns == mtime, "second build() should reuse the ELF"
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"

    data = elf.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "expected a 64-bit ELF"
    (e_entry,) = struct.unpack_from("<Q", data, 24)
    # Multiboot v1 header: 4-byte aligned, within the first 8 KiB.
    offset = next(o for o in range(0, 8192, 4) if data[o : o + 4] == struct.pack("<I", 0x1BADB002))
    magic, flags, checksum, _hdr, load, _load_end, _bss_end, entry32 = struct.unpack_from("<8I", data, offset)
    assert (magic + flags + checksum) & 0xFFFFFFFF == 0
    assert flags & (1 << 16), "a.out kludge flag needed for QEMU to load a 64-bit ELF"
    assert load == 0x100000
    assert e_entry != entry32, "e_entry must be the 64-bit entry, not the 32-bit stub"


@needs_qemu
def test_qemu_shell(firmware: Path) -> None:
    with _boot(firmware, append="echo boot; mem") as console:
        boot = console.text
        assert "splitvm firmware\n" in boot
        assert f"{PROMPT}echo boot\nboot\n{PROMPT}mem\nRAM: 128 MiB\n" in boot

        assert console.command("echo hello   world") == ["hello world"]
        assert console.command("mem") == ["RAM: 128 MiB"]

        lspci = console.command("lspci")
        assert any(line.startswith("00:00.0 0600: 8086:1237") for line in lspci), lspci
        assert any(line.startswith("00:01.0 0601: 8086:7000") for line in lspci), lspci
        nic = next(i for i, line in enumerate(lspci) if " 8086:100e " in line)
        assert lspci[nic].endswith("Ethernet controller")
        nic_bars = []
        for line in lspci[nic + 1 :]:
            if not line.startswith("  "):
                break
            nic_bars.append(line)
        assert any("32-bit memory at 0xe" in bar and "[size 0x20000]" in bar for bar in nic_bars), lspci

        info = console.command("info")
        assert info[0] == "platform: qemu"

        assert console.command("count 3 4") == ["0000", "0001", "0002"]
        assert console.command("frobnicate now") == ["unknown command: frobnicate"]

        console.send_line("exit 5")
        assert console.wait_exit(COMMAND_TIMEOUT) == (5 << 1) | 1


@needs_qemu
def test_qemu_poweroff(firmware: Path) -> None:
    with _boot(firmware) as console:
        assert "splitvm firmware\n" in console.text
        console.send_line("poweroff")
        assert console.wait_exit(COMMAND_TIMEOUT) == 0
