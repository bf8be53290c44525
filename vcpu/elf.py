"""Load a freestanding ELF64 guest program (PT_LOAD segments at p_paddr)."""

from __future__ import annotations

import struct
from pathlib import Path

from vcpu.memory import GuestMemory

# One struct definition per layout (ELF64 header and program header, System V gABI).
ELF64_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
ELF64_PHDR = struct.Struct("<IIQQQQQQ")
PT_LOAD = 1
EM_X86_64 = 62


class ElfError(ValueError):
    pass


def load_elf(path: Path, mem: GuestMemory) -> int:
    """Copy the PT_LOAD segments into guest RAM, zero their BSS; return the entry point."""
    data = Path(path).read_bytes()
    if len(data) < ELF64_EHDR.size or data[:4] != b"\x7fELF":
        raise ElfError(f"{path}: not an ELF file")
    (ident, _type, machine, _ver, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum,
     *_rest) = ELF64_EHDR.unpack_from(data)
    if ident[4] != 2 or machine != EM_X86_64:
        raise ElfError(f"{path}: not an x86-64 ELF64 program")
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + ELF64_PHDR.size > len(data):
            raise ElfError(f"{path}: program header {i} truncated")
        p_type, _pf, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = ELF64_PHDR.unpack_from(data, off)
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_offset + p_filesz > len(data) or p_filesz > p_memsz:
            raise ElfError(f"{path}: segment {i} extends past the file")
        try:
            mem.write(p_paddr, data[p_offset : p_offset + p_filesz])
            mem.write(p_paddr + p_filesz, bytes(p_memsz - p_filesz))
        except ValueError as e:
            raise ElfError(f"{path}: segment {i} at 0x{p_paddr:x} does not fit in guest RAM") from e
    return entry
