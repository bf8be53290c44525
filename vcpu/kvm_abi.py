"""The KVM ioctl ABI (linux/kvm.h), declared once with cffi.

Only the structs and ioctls splitvm uses. cffi lays the structs out by C rules,
so the sizes below are checked against the kernel's at import (see _SIZES).
"""

from __future__ import annotations

from cffi import FFI

ffi = FFI()
ffi.cdef(
    """
    struct kvm_regs {
        uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
        uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
        uint64_t rip, rflags;
    };
    struct kvm_segment {
        uint64_t base;
        uint32_t limit;
        uint16_t selector;
        uint8_t type, present, dpl, db, s, l, g, avl, unusable, padding;
    };
    struct kvm_dtable {
        uint64_t base;
        uint16_t limit;
        uint16_t padding[3];
    };
    struct kvm_sregs {
        struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
        struct kvm_dtable gdt, idt;
        uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base;
        uint64_t interrupt_bitmap[4];
    };
    struct kvm_userspace_memory_region {
        uint32_t slot;
        uint32_t flags;
        uint64_t guest_phys_addr;
        uint64_t memory_size;
        uint64_t userspace_addr;
    };
    struct kvm_ioeventfd {
        uint64_t datamatch;
        uint64_t addr;
        uint32_t len;
        int32_t fd;
        uint32_t flags;
        uint8_t pad[36];
    };
    struct kvm_run_io {
        uint8_t direction;
        uint8_t size;
        uint16_t port;
        uint32_t count;
        uint64_t data_offset;
    };
    struct kvm_run_mmio {
        uint64_t phys_addr;
        uint8_t data[8];
        uint32_t len;
        uint8_t is_write;
    };
    struct kvm_run_internal {
        uint32_t suberror;
        uint32_t ndata;
        uint64_t data[16];
    };
    struct kvm_run_fail_entry {
        uint64_t hardware_entry_failure_reason;
        uint32_t cpu;
    };
    struct kvm_run {
        uint8_t request_interrupt_window;
        uint8_t immediate_exit;
        uint8_t padding1[6];
        uint32_t exit_reason;
        uint8_t ready_for_interrupt_injection;
        uint8_t if_flag;
        uint16_t flags;
        uint64_t cr8;
        uint64_t apic_base;
        union {
            struct kvm_run_io io;
            struct kvm_run_mmio mmio;
            struct kvm_run_internal internal;
            struct kvm_run_fail_entry fail_entry;
            char padding[256];
        };
    };
    int ioctl(int fd, unsigned long request, ...);
    """
)

_SIZES = {
    "struct kvm_regs": 144,
    "struct kvm_segment": 24,
    "struct kvm_sregs": 312,
    "struct kvm_userspace_memory_region": 32,
    "struct kvm_ioeventfd": 64,
}
for _name, _size in _SIZES.items():
    assert ffi.sizeof(_name) == _size, (_name, ffi.sizeof(_name))
assert ffi.offsetof("struct kvm_run", "io") == 32

libc = ffi.dlopen(None)

KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(0, nr, 0)


def _iow(nr: int, struct: str) -> int:
    return _ioc(1, nr, ffi.sizeof(struct))


def _ior(nr: int, struct: str) -> int:
    return _ioc(2, nr, ffi.sizeof(struct))


KVM_GET_API_VERSION = _io(0x00)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_CREATE_VM = _io(0x01)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, "struct kvm_userspace_memory_region")
KVM_SET_TSS_ADDR = _io(0x47)
KVM_IOEVENTFD = _iow(0x79, "struct kvm_ioeventfd")
KVM_RUN = _io(0x80)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_REGS = _ior(0x81, "struct kvm_regs")
KVM_SET_REGS = _iow(0x82, "struct kvm_regs")
KVM_GET_SREGS = _ior(0x83, "struct kvm_sregs")
KVM_SET_SREGS = _iow(0x84, "struct kvm_sregs")

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

EXIT_NAMES = {
    KVM_EXIT_UNKNOWN: "UNKNOWN",
    KVM_EXIT_EXCEPTION: "EXCEPTION",
    KVM_EXIT_IO: "IO",
    KVM_EXIT_HLT: "HLT",
    KVM_EXIT_MMIO: "MMIO",
    KVM_EXIT_SHUTDOWN: "SHUTDOWN",
    KVM_EXIT_FAIL_ENTRY: "FAIL_ENTRY",
    KVM_EXIT_INTR: "INTR",
    KVM_EXIT_INTERNAL_ERROR: "INTERNAL_ERROR",
}


def ioctl(fd: int, request: int, arg: object = 0) -> int:
    """ioctl(2) through libc; raises OSError on failure. Releases the GIL (cffi)."""
    if isinstance(arg, int):
        arg = ffi.cast("unsigned long", arg)
    ret = libc.ioctl(fd, ffi.cast("unsigned long", request), arg)
    if ret < 0:
        err = ffi.errno
        raise OSError(err, f"ioctl 0x{request:x}: {__import__('os').strerror(err)}")
    return ret
