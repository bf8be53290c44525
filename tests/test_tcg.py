"""The tcg accelerator (vcpu/tcg.py): hand-assembled guests in-process, then the real VM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("unicorn")

from vcpu.accel import GuestCrash, GuestExit  # noqa: E402
from vcpu.memory import FIRMWARE_BASE, GuestMemory, MiB, create_ram_fd  # noqa: E402
from vcpu.tcg import TcgMachine, mmio_window  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RAM = 64 * MiB


def code(*lines: str) -> bytes:
    """Join hex-encoded instructions (each written next to its assembly below)."""
    return bytes.fromhex("".join(line.split("#")[0] for line in lines).replace(" ", ""))


class RecordingRouter:
    """Records every access; port 0x504 ends the run like PlatformPorts does."""

    def __init__(self, in_value: bytes = b"\x5a", mmio_value: int = 0x2A) -> None:
        self.pio_calls: list[tuple[int, int, int, bool, bytes, int]] = []
        self.mmio_calls: list[tuple[int, int, int, bool, bytes]] = []
        self.in_value = in_value
        self.mmio_value = mmio_value
        self.lock = threading.Lock()
        self.parked: set[int] = set()
        self.all_parked = threading.Event()
        self.wait_for_parked = 0

    def pio(self, cpu: int, port: int, size: int, is_write: bool, data: bytes, count: int) -> bytes:
        with self.lock:
            self.pio_calls.append((cpu, port, size, is_write, data, count))
        if port == 0x504 and is_write:
            if self.wait_for_parked:
                self.all_parked.wait(10)
            raise GuestExit(int.from_bytes(data, "little"))
        if port == 0x508 and is_write:
            with self.lock:
                self.parked.add(cpu)
                if len(self.parked) >= self.wait_for_parked:
                    self.all_parked.set()
            return b""
        return b"" if is_write else (self.in_value * size * count)[: size * count]

    def mmio(self, cpu: int, addr: int, size: int, is_write: bool, data: bytes) -> bytes:
        with self.lock:
            self.mmio_calls.append((cpu, addr, size, is_write, data))
        return b"" if is_write else self.mmio_value.to_bytes(size, "little")

    def writes(self) -> list[tuple[int, bytes]]:
        return [(port, data) for _cpu, port, _size, is_write, data, _count in self.pio_calls if is_write]


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory(create_ram_fd(RAM), RAM)
    yield m
    m.close()
    os.close(m.fd)


def run_guest(mem: GuestMemory, program: bytes, router: RecordingRouter, ncpus: int = 1,
              timeout: float = 10.0, prepare: Callable[[], None] | None = None) -> int:
    """Run `program` at FIRMWARE_BASE; fail the test (not hang it) if it does not end.

    `prepare` runs after the machine is built (and so after its page tables are).
    """
    mem.write(FIRMWARE_BASE, program)
    machine = TcgMachine(mem, ncpus)
    if prepare is not None:
        prepare()
    result: list[object] = []

    def body() -> None:
        try:
            result.append(machine.run(FIRMWARE_BASE, router))
        except BaseException as e:  # noqa: BLE001 - checked by the caller
            result.append(e)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the guest did not end"
    if isinstance(result[0], BaseException):
        raise result[0]
    assert machine.exits == len(router.pio_calls) + len(router.mmio_calls)
    return result[0]


def test_pio_out_in_and_exit(mem: GuestMemory) -> None:
    program = code(
        "66baf803",  # mov dx, 0x3f8
        "b048",  # mov al, 'H'
        "ee",  # out dx, al
        "ec",  # in al, dx            -> 0x5a from the router
        "66baf903",  # mov dx, 0x3f9
        "ee",  # out dx, al           echoes what IN read
        "66ba0405",  # mov dx, 0x504
        "b807000000",  # mov eax, 7
        "ef",  # out dx, eax          exit 7
    )
    router = RecordingRouter()
    assert run_guest(mem, program, router) == 7
    assert router.writes() == [(0x3F8, b"H"), (0x3F9, b"\x5a"), (0x504, b"\x07\x00\x00\x00")]
    assert (0, 0x3F8, 1, False, b"", 1) in router.pio_calls


def test_nothing_reaches_the_router_after_exit(mem: GuestMemory) -> None:
    # emu_stop takes effect at the end of a translation block: the OUT after the exit
    # must not be routed.
    program = code("66ba0405", "b803000000", "ef", "66baf803", "ee")  # exit 3; out 0x3f8
    router = RecordingRouter()
    assert run_guest(mem, program, router) == 3
    assert [p for _c, p, *_ in router.pio_calls] == [0x504]


def test_mmio_read_and_write_reach_the_router(mem: GuestMemory) -> None:
    program = code(
        "48bb000000e000000000",  # mov rbx, 0xE0000000
        "8b03",  # mov eax, [rbx]      -> 0x2a from the router
        "894308",  # mov [rbx+8], eax
        "66ba0405",  # mov dx, 0x504
        "ef",  # out dx, eax          exit with what was read
    )
    router = RecordingRouter()
    assert run_guest(mem, program, router) == 0x2A
    assert router.mmio_calls == [
        (0, 0xE0000000, 4, False, b""),
        (0, 0xE0000008, 4, True, b"\x2a\x00\x00\x00"),
    ]


def test_mmio_window_is_everything_but_ram_below_4g() -> None:
    assert mmio_window(64 * MiB) == (64 * MiB, 4 << 30)
    assert mmio_window(4 << 30) is None
    assert mmio_window((4 << 30) + 512 * MiB) == ((4 << 30) + 512 * MiB, 5 << 30)


def test_ram_is_shared_with_the_host(mem: GuestMemory) -> None:
    program = code(
        "48c7c700002000",  # mov rdi, 0x200000
        "c70744332211",  # mov dword [rdi], 0x11223344
        "66ba0405",  # mov dx, 0x504
        "ef",  # out dx, eax
    )
    run_guest(mem, program, RecordingRouter())
    assert mem.read_u32(0x200000) == 0x11223344


def test_string_io(mem: GuestMemory) -> None:
    program = code(
        "48c7c600011000",  # mov rsi, 0x100100
        "c60641",  # mov byte [rsi], 'A'
        "66c746014243",  # mov word [rsi+1], 'BC'
        "b903000000",  # mov ecx, 3
        "66baf803",  # mov dx, 0x3f8
        "f36e",  # rep outsb
        "66ba0405",  # mov dx, 0x504
        "ef",  # out dx, eax
    )
    router = RecordingRouter()
    run_guest(mem, program, router)
    # unicorn hands string I/O to the hooks one element at a time.
    assert router.writes()[:3] == [(0x3F8, b"A"), (0x3F8, b"B"), (0x3F8, b"C")]


def test_secondary_vcpus_run_and_park(mem: GuestMemory) -> None:
    program = code(
        "4885ff",  # test rdi, rdi
        "750a",  # jnz park
        "66ba0405",  # mov dx, 0x504
        "89f8",  # mov eax, edi
        "83c005",  # add eax, 5
        "ef",  # out dx, eax          vCPU 0: exit 5
        "66ba0805",  # park: mov dx, 0x508
        "b8e8030000",  # mov eax, 1000
        "ef",  # out dx, eax
        "ebf4",  # jmp park
    )
    router = RecordingRouter()
    router.wait_for_parked = 3  # vCPU 0 exits only once 1..3 have parked
    assert run_guest(mem, program, router, ncpus=4) == 5
    assert router.parked == {1, 2, 3}


@pytest.mark.parametrize(
    ("name", "program", "message"),
    [
        ("hlt", code("f4"), "general protection"),  # CPL 3, as under KVM
        ("mov_cr0", code("0f20c0"), "general protection"),  # mov rax, cr0
        ("unmapped", code("48b80000000005000000", "ffe0"), "page fault"),  # mov rax, 0x500000000; jmp rax
        ("ud2", code("0f0b"), "unicorn"),
        ("fault", code("48b80000000005000000", "8b00"), "page fault"),  # mov eax, [rax]
    ],
)
def test_guest_errors_crash(mem: GuestMemory, name: str, program: bytes, message: str) -> None:
    with pytest.raises(GuestCrash, match=message) as info:
        run_guest(mem, program, RecordingRouter(), timeout=5)
    assert "rip=0x" in str(info.value)


def test_guest_runs_at_cpl3(mem: GuestMemory) -> None:
    from vcpu.memory import PD_GPA

    def supervisor_only() -> None:
        mem.write_u64(PD_GPA + 8, 0x200000 | 0x83)  # the 2 MiB page at 0x200000 without User

    program = code("48c7c700002000", "8b07")  # mov rdi, 0x200000; mov eax, [rdi]
    with pytest.raises(GuestCrash, match="page fault.*cr2=0x200000"):
        run_guest(mem, program, RecordingRouter(), timeout=5, prepare=supervisor_only)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="building the firmware needs gcc")
def test_firmware_end_to_end() -> None:
    from vcpu.guest.build import build

    build()
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "-accel", "tcg"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,  # so a hang can be ended with all the VM's processes
    )
    try:
        out, err = proc.communicate(b"echo hi\nexit 7\n", timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the VM did not exit within 120 s")
    assert proc.returncode == 7, err.decode(errors="replace")
    assert b"\nhi\n" in out.replace(b"\r\n", b"\n")
