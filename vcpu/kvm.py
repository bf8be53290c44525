"""The kvm accelerator: a VM on /dev/kvm, one thread per vCPU, exits routed to owners."""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time

from vcpu.accel import AccessRouter, GuestCrash, GuestExit, is_rep_string
from vcpu.kvm_abi import (
    EXIT_NAMES,
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_IO_OUT,
    KVM_EXIT_MMIO,
    KVM_GET_API_VERSION,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_GET_TSC_KHZ,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_RUN,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KVM_SET_TSS_ADDR,
    KVM_SET_USER_MEMORY_REGION,
    ffi,
    ioctl,
)
from vcpu.memory import STACK_PER_VCPU, STACK_TOP, GuestMemory, build_identity_map

KVM_DEVICE = os.environ.get("SPLITVM_KVM_DEVICE", "/dev/kvm")  # overridable to test the fallback

# Long mode at CPL 3 (DESIGN.md "Facts"): CPL 0 code is emulated far too slowly here.
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_PG = 1, 2, 0x10, 0x20, 0x80000000
CR4_PAE = 0x20
EFER_LME, EFER_LMA = 0x100, 0x400
RFLAGS_IOPL3 = 0x3000
RFLAGS_DF = 0x400
STRING_IO_MAX_BYTES = 4096  # what one sharing-page slot carries
USER_CS, USER_DS = 0x33, 0x2B  # GDT slots 6 and 5, RPL 3
TSS_ADDR = 0xFFFBD000  # three pages below 4 GiB that no BAR uses (Intel VMX needs them)


def kvm_unavailable_reason() -> str | None:
    """None if /dev/kvm works, else one line saying why."""
    if not os.path.exists(KVM_DEVICE):
        return f"{KVM_DEVICE} does not exist (load the kvm module, or use -accel tcg)"
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open {KVM_DEVICE}: {e.strerror} (use -accel tcg)"
    try:
        version = ioctl(fd, KVM_GET_API_VERSION)
        if version != 12:
            return f"{KVM_DEVICE} API version {version}, expected 12"
    finally:
        os.close(fd)
    return None


def _segment(seg: object, selector: int, code: bool) -> None:
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.selector = selector
    seg.type = 0xB if code else 0x3  # execute/read accessed; read/write accessed
    seg.present = 1
    seg.dpl = 3
    seg.db = 0 if code else 1
    seg.s = 1
    seg.l = 1 if code else 0
    seg.g = 1


class KvmVm:
    """A VM with guest RAM in one memslot at GPA 0 and `ncpus` vCPUs in long mode."""

    def __init__(self, mem: GuestMemory, ncpus: int) -> None:
        self.mem = mem
        self.kvm_fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        self.vm_fd = ioctl(self.kvm_fd, KVM_CREATE_VM, 0)
        try:
            ioctl(self.vm_fd, KVM_SET_TSS_ADDR, TSS_ADDR)
        except OSError:
            pass  # AMD and the pvm module need no TSS pages
        region = ffi.new("struct kvm_userspace_memory_region *")
        region.slot = 0
        region.guest_phys_addr = 0
        region.memory_size = mem.size
        region.userspace_addr = mem.address()
        ioctl(self.vm_fd, KVM_SET_USER_MEMORY_REGION, region)
        self.mmap_size = ioctl(self.kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0)
        self.cr3 = build_identity_map(mem)
        self.vcpus = [KvmVcpu(self, i) for i in range(ncpus)]
        self.string_ports: set[int] = set()

    def fast_string_io(self, ports: list[int]) -> None:
        """Ports whose `rep ins`/`rep outs` the vCPU completes in one trapped access."""
        self.string_ports = set(ports)

    def tsc_khz(self) -> int:
        try:
            return ioctl(self.vcpus[0].fd, KVM_GET_TSC_KHZ, 0)
        except OSError:
            return 0

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        os.close(self.vm_fd)
        os.close(self.kvm_fd)


class KvmVcpu:
    def __init__(self, vm: KvmVm, index: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = ioctl(vm.vm_fd, KVM_CREATE_VCPU, index)
        self.run_map = mmap.mmap(self.fd, vm.mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run = ffi.cast("struct kvm_run *", ffi.from_buffer(self.run_map))
        self.run_buf = ffi.buffer(ffi.from_buffer(self.run_map))
        self.exits = 0

    def setup_long_mode(self, entry: int) -> None:
        sregs = ffi.new("struct kvm_sregs *")
        ioctl(self.fd, KVM_GET_SREGS, sregs)
        _segment(sregs.cs, USER_CS, code=True)
        for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
            _segment(seg, USER_DS, code=False)
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG
        sregs.cr3 = self.vm.cr3
        sregs.cr4 = CR4_PAE
        sregs.efer = EFER_LME | EFER_LMA
        ioctl(self.fd, KVM_SET_SREGS, sregs)
        regs = ffi.new("struct kvm_regs *")
        regs.rip = entry
        regs.rsp = STACK_TOP - self.index * STACK_PER_VCPU - 8
        regs.rdi = self.index
        regs.rflags = 0x2 | RFLAGS_IOPL3
        ioctl(self.fd, KVM_SET_REGS, regs)

    def registers(self) -> str:
        regs = ffi.new("struct kvm_regs *")
        ioctl(self.fd, KVM_GET_REGS, regs)
        names = ["rip", "rsp", "rbp", "rflags", "rax", "rbx", "rcx", "rdx", "rsi", "rdi"]
        return " ".join(f"{n}=0x{getattr(regs, n):x}" for n in names)

    def loop(self, router: AccessRouter, stop: threading.Event) -> None:
        """KVM_RUN until the guest exits or crashes (steps 2 and 6 of the I/O path)."""
        run = self.run
        buf = self.run_buf
        cpu = self.index
        fd = self.fd
        vm = self.vm
        while not stop.is_set():
            try:
                ioctl(fd, KVM_RUN, 0)
            except OSError as e:
                if e.errno == 4:  # EINTR: a signal; check stop and go on
                    continue
                raise
            self.exits += 1
            reason = run.exit_reason
            if reason == KVM_EXIT_IO:
                io = run.io
                size, count, off = io.size, io.count, io.data_offset
                n = size * count
                if io.direction == KVM_EXIT_IO_OUT:
                    router.pio(cpu, io.port, size, True, bytes(buf[off : off + n]), count)
                else:
                    buf[off : off + n] = router.pio(cpu, io.port, size, False, b"", count)
                if count == 1 and io.port in vm.string_ports:
                    self._rest_of_string(router, io.port, size, io.direction == KVM_EXIT_IO_OUT)
            elif reason == KVM_EXIT_MMIO:
                m = run.mmio
                if m.is_write:
                    router.mmio(cpu, m.phys_addr, m.len, True, bytes(ffi.buffer(m.data, m.len)))
                else:
                    ffi.memmove(m.data, router.mmio(cpu, m.phys_addr, m.len, False, b""), m.len)
            elif reason == KVM_EXIT_INTR:
                continue
            else:
                name = EXIT_NAMES.get(reason, str(reason))
                raise GuestCrash(f"vCPU {cpu}: KVM exit {name}: {self.registers()}")

    def _rest_of_string(self, router: AccessRouter, port: int, size: int, out: bool) -> None:
        """Finish a `rep insw`/`rep outsw` with one access to its owner instead of one exit
        per element (KVM exits for every element here; the KVM document's "string I/O").

        The exit just handled is the instruction's current element. immediate_exit makes
        KVM complete it and return at once, so the registers are architectural again;
        then the remaining RCX elements move between the device and guest memory at
        RDI/RSI in one slot, and RCX/RDI/RSI are advanced as the CPU would have. Guest
        virtual = physical (the vcpu's identity map; CPL 3 cannot change CR3).
        """
        regs = ffi.new("struct kvm_regs *")
        ioctl(self.fd, KVM_GET_REGS, regs)
        if regs.rflags & RFLAGS_DF or regs.rcx <= 1 or not self._is_rep_string(regs.rip, out):
            return
        self.run.immediate_exit = 1
        try:
            ioctl(self.fd, KVM_RUN, 0)
        except OSError as e:
            if e.errno != errno.EINTR:
                raise
        finally:
            self.run.immediate_exit = 0
        ioctl(self.fd, KVM_GET_REGS, regs)
        mem = self.vm.mem
        n = min(regs.rcx, STRING_IO_MAX_BYTES // size)
        addr = regs.rsi if out else regs.rdi
        if n == 0 or addr + n * size > mem.size:
            return  # let the CPU go on element by element (and fault, if it must)
        if out:
            router.pio(self.index, port, size, True, mem.read(addr, n * size), n)
            regs.rsi += n * size
        else:
            mem.write(addr, router.pio(self.index, port, size, False, b"", n))
            regs.rdi += n * size
        regs.rcx -= n  # at 0, KVM finds `rep` with nothing left and moves past it
        ioctl(self.fd, KVM_SET_REGS, regs)

    def _is_rep_string(self, rip: int, out: bool) -> bool:
        try:
            return is_rep_string(self.vm.mem.read(rip, 4), out)
        except ValueError:
            return False

    def close(self) -> None:
        self.run_map.close()
        os.close(self.fd)


def run_vcpus(vm: KvmVm, entry: int, router: AccessRouter) -> int:
    """Run every vCPU as a thread; return the guest's exit code (raise GuestCrash)."""
    stop = threading.Event()
    outcome: list[BaseException] = []

    def body(v: KvmVcpu) -> None:
        try:
            v.loop(router, stop)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            outcome.append(e)
            stop.set()

    for v in vm.vcpus:
        v.setup_long_mode(entry)
    threads = [threading.Thread(target=body, args=(v,), daemon=True, name=f"vcpu{v.index}") for v in vm.vcpus]
    for t in threads:
        t.start()
    while not stop.is_set():
        stop.wait(0.5)
    # Secondary vCPUs may sit in KVM_RUN; they are daemon threads and end with the process.
    time.sleep(0)
    err = outcome[0]
    if isinstance(err, GuestExit):
        return err.code
    raise err
