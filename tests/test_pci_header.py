"""The PCI type-0 header model: sizing, assignment, read-only fields, command gating."""

import pytest

from backends.pci import BAR0, COMMAND, STATUS, BarSpec, PciConfigHeader


def make() -> PciConfigHeader:
    return PciConfigHeader(
        0x8086, 0x100E, 0x020000, revision=3,
        bars=[BarSpec(0x20000), BarSpec(0x40, io=True), BarSpec(0x4000, is64=True), None],
        interrupt_pin=1,
    )


def test_ids_and_class_are_read_only():
    h = make()
    assert h.read(0, 4) == 0x100E8086
    assert h.read(0x08, 4) == 0x02000003
    h.write(0, 4, 0x12345678)
    h.write(0x08, 4, 0)
    assert h.read(0, 4) == 0x100E8086
    assert h.read(0x08, 4) == 0x02000003
    assert h.read(0x3D, 1) == 1
    h.write(0x3D, 1, 4)
    assert h.read(0x3D, 1) == 1


def test_bar_sizing_reads_back_size_mask_and_flags():
    h = make()
    for i in range(6):
        h.write(BAR0 + 4 * i, 4, 0xFFFFFFFF)
    assert h.read(BAR0, 4) == 0xFFFE0000  # 128 KiB memory, 32-bit, not prefetchable
    assert h.read(BAR0 + 4, 4) == 0xFFFFFFC1  # 64 bytes of I/O
    assert h.read(BAR0 + 8, 4) == 0xFFFFC004  # 16 KiB, 64-bit type
    assert h.read(BAR0 + 12, 4) == 0xFFFFFFFF  # its upper half: all writable
    assert h.read(BAR0 + 16, 4) == 0  # unimplemented
    assert h.read(BAR0 + 20, 4) == 0


def test_assignment_and_command_gate_the_bar_map():
    h = make()
    h.write(BAR0, 4, 0xE0000000)
    h.write(BAR0 + 4, 4, 0xC000)
    h.write(BAR0 + 8, 4, 0x00004000)
    h.write(BAR0 + 12, 4, 0x1)
    assert all(not m.enabled for m in h.bar_map())
    h.write(COMMAND, 2, 0x3)  # I/O and memory decode
    maps = {m.index: m for m in h.bar_map()}
    assert (maps[0].addr, maps[0].size, maps[0].io, maps[0].enabled) == (0xE0000000, 0x20000, False, True)
    assert (maps[1].addr, maps[1].io) == (0xC000, True)
    assert maps[2].addr == 0x1_0000_4000
    h.write(COMMAND, 2, 0x1)  # memory decode off: only the I/O BAR decodes
    assert [m.index for m in h.bar_map() if m.enabled] == [1]


def test_bar_low_bits_ignore_writes_and_byte_writes_work():
    h = make()
    h.write(BAR0, 4, 0xE0001234)
    assert h.read(BAR0, 4) == 0xE0000000
    h.write(BAR0 + 3, 1, 0xF0)
    assert h.read(BAR0, 4) == 0xF0000000


def test_status_bits_are_write_one_to_clear():
    h = make()
    h.space[STATUS + 1] = 0x80  # detected parity error
    h.write(STATUS, 2, 0x0000)
    assert h.read(STATUS, 2) == 0x8000
    h.write(STATUS, 2, 0x8000)
    assert h.read(STATUS, 2) == 0


def test_out_of_range_and_odd_sizes_are_harmless():
    h = make()
    assert h.read(0xFE, 4) == 0xFFFFFFFF
    h.write(0xFF, 4, 0xFFFFFFFF)
    h.write(-4, 4, 0)
    assert h.read(0, 3) == 0xFFFFFF


def test_bad_bar_specs_are_refused():
    with pytest.raises(ValueError):
        BarSpec(0x3000)
    with pytest.raises(ValueError):
        PciConfigHeader(1, 2, 3, bars=[None, None, None, None, None, BarSpec(0x1000, is64=True)])


def test_snapshot_restore_round_trip():
    h = make()
    h.write(BAR0, 4, 0xE0000000)
    h.write(COMMAND, 2, 0x7)
    g = make()
    g.restore(h.snapshot())
    assert g.bar_map() == h.bar_map()
