"""The tcg accelerator: the same guest under unicorn (QEMU's TCG), for hosts without /dev/kvm.

It mirrors vcpu/kvm.py: guest RAM is the same memfd mapping (mem_map_ptr, so backends'
DMA is seen live), the vCPUs start in long mode at CPL 3 with IOPL 3 on the page tables
of build_identity_map, IN/OUT and MMIO go to the AccessRouter, and anything else the
guest does that KVM would not let it (hlt, a fault, an invalid opcode) is a GuestCrash.
"""

from __future__ import annotations

import struct
import threading

import unicorn
from unicorn import x86_const as x86

from vcpu.accel import AccessRouter, GuestCrash, GuestExit, is_rep_string
from vcpu.memory import STACK_PER_VCPU, STACK_TOP, GiB, GuestMemory, build_identity_map

# Same control-register and segment values as vcpu/kvm.py.
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_PG = 1, 2, 0x10, 0x20, 0x80000000
CR4_PAE = 0x20
EFER_LME, EFER_LMA = 0x100, 0x400
MSR_EFER = 0xC0000080
RFLAGS_IOPL3 = 0x3000
USER_CS, USER_DS = 0x33, 0x2B  # GDT slots 6 and 5, RPL 3
KERNEL_CS, KERNEL_DS = 0x08, 0x10  # only for the iretq below

# Unicorn loads segment registers from a real GDT (KVM takes the hidden parts directly),
# so we place one in guest RAM at 0x800, which nothing else uses (page tables start at
# 0x1000), and after it the one instruction that drops each vCPU to CPL 3.
GDT_GPA = 0x800
IRET_GPA = 0x880
IRET_CODE = b"\x48\xcf"  # iretq
GDT = (
    0,
    0x00AF9A000000FFFF,  # 0x08: 64-bit code, DPL 0
    0x00CF92000000FFFF,  # 0x10: data, DPL 0
    0,
    0,
    0x00CFF2000000FFFF,  # 0x2B: data, DPL 3
    0x00AFFA000000FFFF,  # 0x33: 64-bit code, DPL 3
)

# Never reached (non-canonical): emu_start runs until a hook stops it or the guest faults.
NO_UNTIL = 0xFFFF_FFFF_FFFF_FFFF

EXCEPTION_NAMES = {
    0: "#DE divide error", 1: "#DB debug", 3: "#BP breakpoint", 4: "#OF overflow", 5: "#BR bound",
    6: "#UD invalid opcode", 7: "#NM no FPU", 8: "#DF double fault", 10: "#TS invalid TSS",
    11: "#NP segment not present", 12: "#SS stack fault", 13: "#GP general protection",
    14: "#PF page fault", 16: "#MF x87 error", 17: "#AC alignment check", 18: "#MC machine check",
    19: "#XM SIMD error",
}

REGISTERS = (
    ("rip", x86.UC_X86_REG_RIP), ("rsp", x86.UC_X86_REG_RSP), ("rbp", x86.UC_X86_REG_RBP),
    ("rflags", x86.UC_X86_REG_RFLAGS), ("rax", x86.UC_X86_REG_RAX), ("rbx", x86.UC_X86_REG_RBX),
    ("rcx", x86.UC_X86_REG_RCX), ("rdx", x86.UC_X86_REG_RDX), ("rsi", x86.UC_X86_REG_RSI),
    ("rdi", x86.UC_X86_REG_RDI), ("cr2", x86.UC_X86_REG_CR2),
)


def mmio_window(ram_size: int) -> tuple[int, int] | None:
    """[start, end) of guest-physical space that is not RAM but is identity-mapped.

    KVM turns every access there into an MMIO exit; we map it with mmio_map so that it
    behaves the same (the PCI window 0xE0000000-4 GiB included). None if RAM fills it.
    """
    end = max(4, -(-ram_size // GiB)) * GiB  # what build_identity_map maps
    if ram_size >= end:
        return None
    return ram_size, end


class TcgVcpu:
    """One unicorn instance: unicorn is not thread-safe per instance, so one per vCPU thread."""

    def __init__(self, machine: TcgMachine, index: int) -> None:
        self.machine = machine
        self.index = index
        self.uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        self.router: AccessRouter | None = None
        self.pending: BaseException | None = None  # raised in a hook, re-raised after emu_start
        self.read_ahead: tuple[int, int, list[int]] | None = None  # (port, size, values) of a rep ins
        mem = machine.mem
        self.uc.mem_map_ptr(0, mem.size, unicorn.UC_PROT_ALL, mem.address())
        window = mmio_window(mem.size)
        if window is not None:
            start, end = window
            self.uc.mmio_map(start, end - start, self._mmio_read, start, self._mmio_write, start)
        self.uc.hook_add(unicorn.UC_HOOK_INSN, self._pio_in, None, 1, 0, x86.UC_X86_INS_IN)
        self.uc.hook_add(unicorn.UC_HOOK_INSN, self._pio_out, None, 1, 0, x86.UC_X86_INS_OUT)
        # Without this hook unicorn reports any exception only as UC_ERR_EXCEPTION; with it
        # we learn the vector. The guest has no IDT, so every exception is a crash anyway.
        self.uc.hook_add(unicorn.UC_HOOK_INTR, self._interrupt)

    def setup_long_mode(self, entry: int) -> None:
        uc = self.uc
        uc.reg_write(x86.UC_X86_REG_GDTR, (0, GDT_GPA, len(GDT) * 8 - 1, 0))
        uc.reg_write(x86.UC_X86_REG_CR3, self.machine.cr3)
        uc.reg_write(x86.UC_X86_REG_CR4, CR4_PAE)
        uc.reg_write(x86.UC_X86_REG_MSR, (MSR_EFER, EFER_LME | EFER_LMA))
        uc.reg_write(x86.UC_X86_REG_CR0, CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG)
        # unicorn writes CS/SS selectors but leaves the CPL at 0 (checked: a supervisor-only
        # page stays readable), so we enter CPL 3 as a kernel would: from ring 0 through
        # an iretq frame at the top of the vCPU's stack, popped before the guest runs.
        uc.reg_write(x86.UC_X86_REG_CS, KERNEL_CS)
        uc.reg_write(x86.UC_X86_REG_SS, KERNEL_DS)
        for reg in (x86.UC_X86_REG_DS, x86.UC_X86_REG_ES, x86.UC_X86_REG_FS, x86.UC_X86_REG_GS):
            uc.reg_write(reg, USER_DS)
        rsp = STACK_TOP - self.index * STACK_PER_VCPU - 8
        frame = struct.pack("<5Q", entry, USER_CS, 0x2 | RFLAGS_IOPL3, rsp, USER_DS)
        self.machine.mem.write(rsp - len(frame), frame)
        uc.reg_write(x86.UC_X86_REG_RSP, rsp - len(frame))
        uc.reg_write(x86.UC_X86_REG_RDI, self.index)
        uc.reg_write(x86.UC_X86_REG_RFLAGS, 0x2)
        uc.reg_write(x86.UC_X86_REG_RIP, IRET_GPA)

    def registers(self) -> str:
        return " ".join(f"{n}=0x{self.uc.reg_read(r):x}" for n, r in REGISTERS)

    # -- hooks: each stops emulation on an exception and leaves it in self.pending ---------
    def _fail(self, exc: BaseException) -> None:
        if self.pending is None:
            self.pending = exc
        self.uc.emu_stop()

    def _check_stop(self) -> None:
        # Another vCPU ended the run: leave emu_start at the next instruction boundary.
        if self.machine.stop.is_set():
            self._fail(_Stopped())

    # emu_stop only takes effect at the end of the translation block, so the guest may run
    # a few more instructions: once stopped, its accesses no longer reach the router.
    def _pio_in(self, uc: unicorn.Uc, port: int, size: int, _ud: object) -> int:
        if self.pending is not None:
            return 0
        ahead = self.read_ahead
        if ahead is not None and ahead[0] == port and ahead[1] == size and ahead[2]:
            return ahead[2].pop(0)
        self.read_ahead = None
        self.machine.exits += 1
        try:
            count = self._string_count(uc, port, size)
            data = self.router.pio(self.index, port, size, False, b"", count)
        except BaseException as e:  # noqa: BLE001 - re-raised by run_loop
            self._fail(e)
            return 0
        self._check_stop()
        values = [int.from_bytes(data[i : i + size], "little") for i in range(0, len(data), size)]
        if len(values) > 1:
            self.read_ahead = (port, size, values[1:])
        return values[0]

    def _string_count(self, uc: unicorn.Uc, port: int, size: int) -> int:
        """For `rep insw` on a string port: how many elements to fetch in one access.

        Read-ahead as KVM does it in the kernel: never more than RCX, the elements the
        instruction is certain to read (no interrupt can cut it short at CPL 3)."""
        if port not in self.machine.string_ports:
            return 1
        rcx = uc.reg_read(x86.UC_X86_REG_RCX)
        if rcx <= 1 or uc.reg_read(x86.UC_X86_REG_EFLAGS) & 0x400:  # DF: backwards
            return 1
        try:
            code = self.machine.mem.read(uc.reg_read(x86.UC_X86_REG_RIP), 4)
        except ValueError:
            return 1
        return min(rcx, 4096 // size) if is_rep_string(code, out=False) else 1

    def _pio_out(self, uc: unicorn.Uc, port: int, size: int, value: int, _ud: object) -> None:
        if self.pending is not None:
            return
        self.read_ahead = None
        self.machine.exits += 1
        try:
            self.router.pio(self.index, port, size, True, value.to_bytes(size, "little"), 1)
        except BaseException as e:  # noqa: BLE001 - re-raised by run_loop
            self._fail(e)
            return
        self._check_stop()

    # QEMU splits an unaligned access into aligned pieces, so the router may see two
    # accesses where KVM reports one.
    def _mmio_read(self, uc: unicorn.Uc, offset: int, size: int, base: int) -> int:
        if self.pending is not None:
            return 0
        self.machine.exits += 1
        try:
            data = self.router.mmio(self.index, base + offset, size, False, b"")
        except BaseException as e:  # noqa: BLE001 - re-raised by run_loop
            self._fail(e)
            return 0
        return int.from_bytes(data[:size], "little")

    def _mmio_write(self, uc: unicorn.Uc, offset: int, size: int, value: int, base: int) -> None:
        if self.pending is not None:
            return
        self.machine.exits += 1
        try:
            self.router.mmio(self.index, base + offset, size, True, value.to_bytes(size, "little"))
        except BaseException as e:  # noqa: BLE001 - re-raised by run_loop
            self._fail(e)

    def _interrupt(self, uc: unicorn.Uc, vector: int, _ud: object) -> None:
        name = EXCEPTION_NAMES.get(vector, f"vector {vector}")
        self._fail(GuestCrash(f"vCPU {self.index}: {name}: {self.registers()}"))

    # -- the run loop ---------------------------------------------------------------------
    def run_loop(self, router: AccessRouter) -> None:
        """Emulate until a hook raises (GuestExit, _Stopped) or the guest crashes."""
        self.router = router
        self.pending = None
        uc = self.uc
        try:
            uc.emu_start(uc.reg_read(x86.UC_X86_REG_RIP), NO_UNTIL)
        except unicorn.UcError as e:
            if self.pending is None:
                raise GuestCrash(f"vCPU {self.index}: unicorn: {e}: {self.registers()}") from None
        if self.pending is not None:
            raise self.pending
        if self.machine.stop.is_set():
            raise _Stopped  # run() stopped us from another thread
        # emu_start returned by itself (unicorn does so on hlt at CPL 0, which the guest
        # never reaches): KVM would not let the guest go on either.
        raise GuestCrash(f"vCPU {self.index}: emulation stopped: {self.registers()}")


class _Stopped(Exception):
    """The run ended on another vCPU; this one only leaves its loop."""


class TcgMachine:
    """A VM on unicorn with guest RAM at GPA 0 and `ncpus` vCPUs, each a thread of its own."""

    def __init__(self, mem: GuestMemory, ncpus: int) -> None:
        self.mem = mem
        self.cr3 = build_identity_map(mem)
        mem.write(GDT_GPA, b"".join(struct.pack("<Q", d) for d in GDT))
        mem.write(IRET_GPA, IRET_CODE)
        self.stop = threading.Event()
        self.string_ports: set[int] = set()
        # A plain int bumped from several threads: the GIL makes += safe enough for a
        # statistic, as for KvmVcpu.exits.
        self.exits = 0
        self.vcpus = [TcgVcpu(self, i) for i in range(ncpus)]

    def fast_string_io(self, ports: list[int]) -> None:
        """Ports whose `rep ins` is fetched in one access (their writes the router coalesces)."""
        self.string_ports = set(ports)

    def run(self, entry: int, router: AccessRouter) -> int:
        """Run every vCPU as a thread; return the guest's exit code (raise GuestCrash).

        unicorn's emu_start is a ctypes call, which drops the GIL, so the vCPUs do run in
        parallel; hooks take the GIL back. Secondary vCPUs only park on port 0x508.
        """
        self.stop.clear()
        outcome: list[BaseException] = []
        lock = threading.Lock()

        def body(v: TcgVcpu) -> None:
            try:
                v.run_loop(router)
            except _Stopped:
                return
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                with lock:
                    outcome.append(e)
                self.stop.set()

        for v in self.vcpus:
            v.setup_long_mode(entry)
        threads = [threading.Thread(target=body, args=(v,), daemon=True, name=f"vcpu{v.index}")
                   for v in self.vcpus]
        for t in threads:
            t.start()
        while not self.stop.is_set():
            self.stop.wait(0.5)
        # uc_emu_stop may be called from another thread (unicorn's own timeout does so);
        # a vCPU inside a hook (e.g. a 1 s park on 0x508) sees self.stop when it returns.
        for v in self.vcpus:
            v.uc.emu_stop()
        for t in threads:
            t.join(timeout=2.0)
        err = outcome[0]
        if isinstance(err, GuestExit):
            return err.code
        raise err
