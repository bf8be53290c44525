"""16550A UART model (TI PC16550D datasheet; register numbers from its table 2).

Sans-I/O: register reads and writes in; transmitted bytes and the IRQ level out,
through callables given at construction. Received bytes are pushed in with
`receive()`, no more than `rx_room()` at a time, so input is never dropped here.

There is no character clock: a transmitted byte leaves at once (THRE and TEMT stay
set), and the character-timeout indication (IIR 0x0C) is raised as soon as data
sits in the FIFO below its trigger level.

Restart contract (the host, backends/host.py): a transmitted byte is *staged* in the
state region's output ring with the state that sent it, and the supervisor drains it,
so a killed serial0 never loses or doubles console text; a received byte leaves the
input ring only in the published state that put it in the FIFO; RBR and IIR reads that
change state are answered from the saved result if the process died after publishing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

RBR_THR, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)

IER_ERBFI, IER_ETBEI, IER_ELSI, IER_EDSSI = 0x1, 0x2, 0x4, 0x8
IIR_NONE, IIR_MSR, IIR_THRE, IIR_RDA, IIR_RLS, IIR_TIMEOUT = 0x01, 0x00, 0x02, 0x04, 0x06, 0x0C
IIR_FIFO_ENABLED = 0xC0
FCR_ENABLE, FCR_CLEAR_RX, FCR_CLEAR_TX = 0x1, 0x2, 0x4
LCR_DLAB = 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x1, 0x2, 0x4, 0x8, 0x10
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80

FIFO_DEPTH = 16
TRIGGER_LEVELS = (1, 4, 8, 14)  # FCR bits 7:6


class Uart16550:
    """One UART: 8 registers at a base port, one IRQ line."""

    def __init__(self, tx: Callable[[int], None], irq: Callable[[bool], None]) -> None:
        self.tx = tx
        self.irq = irq
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.lsr = LSR_THRE | LSR_TEMT
        self.scr = 0
        self.fcr = 0
        self.dll = 0x0C  # 9600 baud at reset
        self.dlm = 0
        self.rx: deque[int] = deque()
        self.thre_pending = False  # THR empty interrupt, cleared by IIR read or THR write
        self.irq_level = False

    # -- guest side -------------------------------------------------------------------
    def read(self, reg: int) -> int:
        if reg == RBR_THR:
            if self.lcr & LCR_DLAB:
                return self.dll
            value = self.rx.popleft() if self.rx else 0
            if not self.rx:
                self.lsr &= ~LSR_DR
            self._update_irq()
            return value
        if reg == IER:
            return self.dlm if self.lcr & LCR_DLAB else self.ier
        if reg == IIR_FCR:
            iir = self._iir()
            if iir == IIR_THRE:
                self.thre_pending = False  # reading IIR clears a THRE interrupt (table 4)
                self._update_irq()
            return iir | (IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE else 0)
        if reg == LCR:
            return self.lcr
        if reg == MCR:
            return self.mcr
        if reg == LSR:
            value = self.lsr
            self.lsr &= ~LSR_OE  # error bits clear on read
            self._update_irq()
            return value
        if reg == MSR:
            return self._msr()
        if reg == SCR:
            return self.scr
        return 0xFF

    def write(self, reg: int, value: int) -> None:
        value &= 0xFF
        if reg == RBR_THR:
            if self.lcr & LCR_DLAB:
                self.dll = value
                return
            if self.mcr & MCR_LOOP:
                self._push_rx(value)
            else:
                self.tx(value)
            self.thre_pending = True  # the byte left at once: THR is empty again
            self._update_irq()
        elif reg == IER:
            if self.lcr & LCR_DLAB:
                self.dlm = value
                return
            was = self.ier
            self.ier = value & 0x0F
            if self.ier & IER_ETBEI and not was & IER_ETBEI:
                self.thre_pending = True  # enabling ETBEI with THR empty interrupts
            self._update_irq()
        elif reg == IIR_FCR:
            if value & FCR_CLEAR_RX:
                self.rx.clear()
                self.lsr &= ~LSR_DR
            self.fcr = value & 0xC9  # enable, DMA mode, trigger level; clear bits self-reset
            self._update_irq()
        elif reg == LCR:
            self.lcr = value
        elif reg == MCR:
            self.mcr = value & 0x1F
            self._update_irq()
        elif reg == SCR:
            self.scr = value
        # LSR and MSR are read-only.

    # -- host side --------------------------------------------------------------------
    def rx_capacity(self) -> int:
        return FIFO_DEPTH if self.fcr & FCR_ENABLE else 1

    def rx_room(self) -> int:
        if self.mcr & MCR_LOOP:
            return 0  # in loopback the receiver is cut off from the line
        if not (self.fcr & FCR_ENABLE or self.ier & IER_ERBFI):
            # Hold typed-ahead input until the guest has set the receiver up: its
            # FIFO reset (FCR bit 1) would otherwise throw the first bytes away.
            return 0
        return max(0, self.rx_capacity() - len(self.rx))

    def receive(self, data: bytes) -> None:
        for b in data:
            self._push_rx(b)
        self._update_irq()

    def _push_rx(self, byte: int) -> None:
        if len(self.rx) >= self.rx_capacity():
            self.lsr |= LSR_OE  # overrun: the new byte is lost, as on the chip
            return
        self.rx.append(byte)
        self.lsr |= LSR_DR

    # -- interrupt logic (datasheet table 4, priority order) ---------------------------
    def _iir(self) -> int:
        if self.ier & IER_ELSI and self.lsr & LSR_OE:
            return IIR_RLS
        if self.ier & IER_ERBFI and self.rx:
            trigger = TRIGGER_LEVELS[self.fcr >> 6] if self.fcr & FCR_ENABLE else 1
            return IIR_RDA if len(self.rx) >= trigger else IIR_TIMEOUT
        if self.ier & IER_ETBEI and self.thre_pending:
            return IIR_THRE
        return IIR_NONE

    def _msr(self) -> int:
        if self.mcr & MCR_LOOP:
            m = self.mcr
            return (
                (MSR_CTS if m & MCR_RTS else 0)
                | (MSR_DSR if m & MCR_DTR else 0)
                | (MSR_RI if m & MCR_OUT1 else 0)
                | (MSR_DCD if m & MCR_OUT2 else 0)
            )
        return MSR_CTS | MSR_DSR | MSR_DCD  # a terminal is always attached

    def _update_irq(self) -> None:
        # On a PC the UART's interrupt reaches the PIC only through OUT2.
        level = self._iir() != IIR_NONE and bool(self.mcr & MCR_OUT2)
        if level != self.irq_level:
            self.irq_level = level
            self.irq(level)

    # -- state that outlives the process ------------------------------------------------
    def snapshot(self) -> dict:
        return {
            "ier": self.ier, "lcr": self.lcr, "mcr": self.mcr, "lsr": self.lsr, "scr": self.scr,
            "fcr": self.fcr, "dll": self.dll, "dlm": self.dlm, "rx": bytes(self.rx),
            "thre": self.thre_pending, "irq": self.irq_level,
        }

    def restore(self, s: dict) -> None:
        self.ier, self.lcr, self.mcr, self.lsr = s["ier"], s["lcr"], s["mcr"], s["lsr"]
        self.scr, self.fcr, self.dll, self.dlm = s["scr"], s["fcr"], s["dll"], s["dlm"]
        self.rx = deque(s["rx"])
        self.thre_pending = s["thre"]
        self.irq_level = s["irq"]


class SerialPort:
    """The UART decoded on an ISA port range: wider accesses split into byte accesses."""

    kind = "serial"

    def __init__(self, base: int, tx: Callable[[int], None], irq: Callable[[bool], None]) -> None:
        self.base = base
        self.model = Uart16550(tx, irq)

    def pio(self, port: int, size: int, is_write: bool, data: bytes, count: int) -> bytes:
        out = bytearray()
        for i in range(count):
            for lane in range(size):
                reg = (port + lane - self.base) & 7
                if is_write:
                    self.model.write(reg, data[i * size + lane])
                else:
                    out.append(self.model.read(reg))
        return bytes(out)

    def irq_level(self) -> bool:
        return self.model.irq_level

    def input_room(self) -> int:
        return self.model.rx_room()

    def receive(self, data: bytes) -> None:
        self.model.receive(data)

    def snapshot(self) -> dict:
        return self.model.snapshot()

    def restore(self, state: dict) -> None:
        self.model.restore(state)
