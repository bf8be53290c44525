"""The 16550A model, driven in-process (sans-I/O): registers in, bytes and IRQ level out."""

from backends.serial import (
    IER,
    IIR_FCR,
    LCR,
    LSR,
    MCR,
    MSR,
    RBR_THR,
    SCR,
    SerialPort,
    Uart16550,
)


class Wires:
    def __init__(self):
        self.tx = bytearray()
        self.irq = []

    def uart(self) -> Uart16550:
        return Uart16550(self.tx.append, self.irq.append)


def test_transmit_and_lsr():
    w = Wires()
    u = w.uart()
    for b in b"hi\n":
        assert u.read(LSR) & 0x20  # THRE
        u.write(RBR_THR, b)
    assert bytes(w.tx) == b"hi\n"
    assert u.read(LSR) & 0x60 == 0x60


def test_divisor_latch_shadows_rbr_and_ier():
    w = Wires()
    u = w.uart()
    u.write(LCR, 0x80)
    u.write(RBR_THR, 0x01)
    u.write(IER, 0x00)
    assert (u.read(RBR_THR), u.read(IER)) == (0x01, 0x00)
    u.write(LCR, 0x03)
    assert w.tx == bytearray()  # divisor writes are not transmitted
    assert u.read(LCR) == 0x03


def test_receive_fifo_irq_and_overrun():
    w = Wires()
    u = w.uart()
    assert u.rx_room() == 0  # input waits until the guest sets the receiver up
    u.write(IIR_FCR, 0x07)
    u.write(MCR, 0x08)  # OUT2 gates the IRQ to the PIC
    u.write(IER, 0x01)
    assert u.rx_room() == 16
    u.receive(b"abc")
    assert w.irq == [True]
    assert u.read(LSR) & 1
    assert u.read(IIR_FCR) == 0xC4  # FIFO enabled; 3 bytes reach trigger level 1: data available
    assert bytes(u.read(RBR_THR) for _ in range(3)) == b"abc"
    assert w.irq == [True, False]
    assert not u.read(LSR) & 1
    u.receive(bytes(17))
    assert u.read(LSR) & 0x02  # overrun
    assert not u.read(LSR) & 0x02  # cleared by the read


def test_below_trigger_level_reports_character_timeout():
    w = Wires()
    u = w.uart()
    u.write(IIR_FCR, 0xC7)  # trigger level 14
    u.write(IER, 0x01)
    u.receive(b"abc")
    assert u.read(IIR_FCR) == 0xCC
    u.receive(bytes(11))
    assert u.read(IIR_FCR) == 0xC4


def test_thre_interrupt_cleared_by_iir_read():
    w = Wires()
    u = w.uart()
    u.write(MCR, 0x08)
    u.write(IER, 0x02)
    assert w.irq == [True]
    assert u.read(IIR_FCR) & 0x0F == 0x02
    assert w.irq == [True, False]
    assert u.read(IIR_FCR) & 0x0F == 0x01


def test_no_irq_without_out2():
    w = Wires()
    u = w.uart()
    u.write(IER, 0x03)
    u.write(IIR_FCR, 0x01)
    u.receive(b"x")
    assert w.irq == []


def test_loopback():
    w = Wires()
    u = w.uart()
    u.write(MCR, 0x10 | 0x0B)
    u.write(RBR_THR, 0x41)
    assert w.tx == bytearray()
    assert u.read(RBR_THR) == 0x41
    assert u.read(MSR) & 0xF0 == 0xB0  # CTS DSR DCD from RTS DTR OUT2


def test_scratch_and_snapshot():
    w = Wires()
    u = w.uart()
    u.write(SCR, 0x5A)
    u.write(IIR_FCR, 0x01)
    u.write(IER, 0x01)
    u.receive(b"q")
    v = w.uart()
    v.restore(u.snapshot())
    assert v.read(SCR) == 0x5A
    assert v.read(RBR_THR) == ord("q")


def test_serial_port_splits_wide_and_string_accesses():
    tx = bytearray()
    port = SerialPort(0x3F8, tx.append, lambda _l: None)
    port.pio(0x3F8, 1, True, b"abcd", 4)  # rep outsb
    assert bytes(tx) == b"abcd"
    port.pio(0x3FF, 1, True, b"\x33", 1)
    assert port.pio(0x3FF, 1, False, b"", 2) == b"\x33\x33"
