"""PIIX3 IDE controller (PCI 8086:7010) with two legacy channels and bus-master DMA.

Sans-I/O: port, config and BAR accesses in; interrupt levels out through irq14/irq15;
data moves straight between the raw images and guest RAM. Commands complete at once
(no visible BSY except while SRST is held), but the protocols keep their shape: PIO
moves one DRQ block (a sector, or up to 16 for READ/WRITE MULTIPLE) at a time with an
interrupt per block, and DMA is armed by the accesses and done by `work()` in bounded
chunks whose progress is part of the snapshot.

Register semantics: ATA/ATAPI-6 (T13/1410D rev 3b) clause 7 (register descriptions; 7.14
Status) and clause 9 (protocols: 9.2 software reset, 9.5 PIO data-in, 9.6 PIO data-out, the
DMA and PACKET command protocols, 9.10 EXECUTE DEVICE DIAGNOSTIC, 9.12 signature and
persistence). Commands, Error and Interrupt Reason bits: ATA8-ACS (T13/1699-D rev 3f)
clause 7, 6.2 and 6.3. Bus master: Intel PIIX3 datasheet, "Bus Master IDE" registers.
CD-ROM packet commands live in backends/atapi.py.

Restart contract: every register access is applied to the snapshot the host publishes
atomically, so a killed ide0 replays at most the access it died in (a register write,
or one rep insw/outsw, which moves the same bytes of the same DRQ block again: a PIO
write pwrites a sector only when its block is complete, and the same sector twice is
idempotent). A DMA chunk in work() is replayed from the published progress: pread into
guest RAM and pwrite from it are idempotent. The interrupt is a level, republished at
restart. Nothing here needs exactly-once by luck.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from backends import atapi
from backends.block import BlockImage, BlockImageError
from backends.pci import BarSpec, PciConfigHeader
from vcpu.memory import GuestMemory, GuestMemoryError

PIIX3_VENDOR, PIIX3_IDE_DEVICE, IDE_CLASS = 0x8086, 0x7010, 0x010180
BM_BAR, BM_BAR_SIZE = 4, 16
SECTOR = 512
MAX_MULT = 16  # IDENTIFY word 47: sectors per READ/WRITE MULTIPLE block
BUF_BYTES = MAX_MULT * SECTOR  # the PIO buffer holds one DRQ block at most
DMA_CHUNK = 256 * SECTOR  # bytes moved per work() call
PRD_MAX = 512  # one 4 KiB page of 8-byte PRDs
IOV_MAX = 1024  # preadv/pwritev limit on buffers per call
HEADS, SPT = 16, 63  # the CHS geometry reported and used for CHS addressing

# Legacy ports: command block base, control block (alternate status / device control).
CHANNEL_PORTS = ((0x1F0, 0x3F6), (0x170, 0x376))

# Status register (ATA/ATAPI-6 7.14). Bit 4 is DSC; packet devices report it as SERV (ATA8-ACS 6.1.7).
BSY, DRDY, DF, DSC, DRQ, ERR = 0x80, 0x40, 0x20, 0x10, 0x08, 0x01
# Error register bits (ATA8-ACS 6.2.1 ABRT: bit 2, 6.2.4 IDNF: bit 4).
ABRT, IDNF = 0x04, 0x10
# Device Control register bits.
NIEN, SRST, HOB = 0x02, 0x04, 0x80
# Device register bits.
DEV_LBA, DEV_SLAVE = 0x40, 0x10
# ATAPI interrupt reason in the sector count register (ATA8-ACS 6.3: C/D bit 0, I/O bit 1).
IR_COD, IR_IO = 0x01, 0x02

# Bus-master registers, per channel (PIIX3 datasheet, BMICx/BMISx/BMIDTPx).
BM_START, BM_TO_MEMORY = 0x01, 0x08
BMS_ACTIVE, BMS_ERROR, BMS_INTR, BMS_CAPABLE = 0x01, 0x02, 0x04, 0x60

# Commands (ATA8-ACS clause 7; RECALIBRATE 10h and INITIALIZE DEVICE PARAMETERS 91h are obsolete, not in ACS).
CMD_NOP = 0x00
CMD_NOP_RESET = 0x08  # DEVICE RESET (packet devices)
CMD_RECALIBRATE = 0x10
CMD_READ_SECTORS, CMD_READ_SECTORS_EXT = 0x20, 0x24
CMD_READ_DMA_EXT, CMD_READ_NATIVE_MAX_EXT, CMD_READ_MULTIPLE_EXT = 0x25, 0x27, 0x29
CMD_WRITE_SECTORS, CMD_WRITE_SECTORS_EXT = 0x30, 0x34
CMD_WRITE_DMA_EXT, CMD_WRITE_MULTIPLE_EXT = 0x35, 0x39
CMD_DIAGNOSTIC, CMD_INIT_PARAMS = 0x90, 0x91
CMD_PACKET, CMD_IDENTIFY_PACKET = 0xA0, 0xA1
CMD_READ_MULTIPLE, CMD_WRITE_MULTIPLE, CMD_SET_MULTIPLE = 0xC4, 0xC5, 0xC6
CMD_READ_DMA, CMD_WRITE_DMA = 0xC8, 0xCA
CMD_POWER = (0xE0, 0xE1, 0xE2, 0xE3, 0xE6)  # STANDBY/IDLE (IMMEDIATE), SLEEP: no spindle to stop
# (the Power Management feature set, ATA8-ACS 4.16; a sleeping device need not refuse access here)
CMD_CHECK_POWER, CMD_FLUSH, CMD_FLUSH_EXT = 0xE5, 0xE7, 0xEA
CMD_IDENTIFY, CMD_SET_FEATURES, CMD_READ_NATIVE_MAX = 0xEC, 0xEF, 0xF8

# READ/WRITE commands: (is_write, lba48, how: "pio" | "multiple" | "dma").
RW_COMMANDS: dict[int, tuple[bool, bool, str]] = {
    CMD_READ_SECTORS: (False, False, "pio"), CMD_READ_SECTORS_EXT: (False, True, "pio"),
    CMD_WRITE_SECTORS: (True, False, "pio"), CMD_WRITE_SECTORS_EXT: (True, True, "pio"),
    CMD_READ_MULTIPLE: (False, False, "multiple"), CMD_READ_MULTIPLE_EXT: (False, True, "multiple"),
    CMD_WRITE_MULTIPLE: (True, False, "multiple"), CMD_WRITE_MULTIPLE_EXT: (True, True, "multiple"),
    CMD_READ_DMA: (False, False, "dma"), CMD_READ_DMA_EXT: (False, True, "dma"),
    CMD_WRITE_DMA: (True, False, "dma"), CMD_WRITE_DMA_EXT: (True, True, "dma"),
}
# What a packet device accepts of the ATA set; the rest aborts (PACKET feature set, ATA8-ACS 4.3.1).
ATAPI_ALLOWED = {CMD_NOP, CMD_NOP_RESET, CMD_DIAGNOSTIC, CMD_PACKET, CMD_IDENTIFY_PACKET, CMD_CHECK_POWER,
                 CMD_SET_FEATURES, *CMD_POWER}
# The PACKET feature set signature in LBA Mid/High (ATA8-ACS 7.11.4, Table 85).
PACKET_SIGNATURE = (0x14, 0xEB)

# Transfer kinds of a drive's PIO buffer; X_DMA: in the data phase of a DMA command (no buffer).
X_NONE, X_ATA_IN, X_ATA_OUT, X_REPLY, X_PACKET, X_ATAPI_IN = "", "ata_in", "ata_out", "reply", "packet", "atapi_in"
X_DMA = "dma"


@dataclass
class IdeDriveSpec:
    """One drive: its image (a cdrom's image is read in 2048-byte blocks), kind, strings."""

    image: BlockImage
    media: str = "disk"  # "disk" | "cdrom"
    serial: str = "SPLITVM0001"
    model: str = "splitvm IDE disk"


class Drive:
    """One device's task file and transfer state. Absent drives exist too (spec None):
    they hold the shadow registers both drives of a channel receive."""

    REGS = ("error", "feature", "nsector", "sector", "lcyl", "hcyl",
            "hob_feature", "hob_nsector", "hob_sector", "hob_lcyl", "hob_hcyl", "select", "status")
    STATE = ("xfer", "pos", "end", "fill", "lba", "remaining", "block", "mult_block", "lba48", "bcl",
             "packet_dma", "mult", "mwdma", "udma", "sense_key", "asc", "wce")

    def __init__(self, spec: IdeDriveSpec | None, unit: int) -> None:
        self.spec = spec
        self.unit = unit
        self.cdrom = spec is not None and spec.media == "cdrom"
        if spec is not None and spec.media not in ("disk", "cdrom"):
            raise ValueError(f"media {spec.media!r} is neither disk nor cdrom")
        self.buf = bytearray(BUF_BYTES)
        self.reset_registers()
        self.mult = MAX_MULT
        self.mwdma = self.udma = -1
        self.sense_key = self.asc = 0
        # Volatile write cache enabled (SET FEATURES 02h/82h, IDENTIFY word 85 bit 5). Off by
        # default when the image is write-through (-drive cache=writethrough|directsync), as QEMU.
        self.wce = spec is None or not spec.image.write_through

    @property
    def present(self) -> bool:
        return self.spec is not None

    @property
    def sectors(self) -> int:
        """Capacity in the unit of this drive's commands: 512 (disk) or 2048 (cdrom)."""
        if self.spec is None:
            return 0
        return self.spec.image.size // (atapi.CD_BLOCK if self.cdrom else SECTOR)

    def reset_registers(self) -> None:
        self.error = self.feature = self.nsector = self.sector = self.lcyl = self.hcyl = 0
        self.hob_feature = self.hob_nsector = self.hob_sector = self.hob_lcyl = self.hob_hcyl = 0
        self.select = 0
        self.status = 0
        self.end_transfer()

    def end_transfer(self) -> None:
        self.xfer = X_NONE
        self.pos = self.end = self.fill = 0
        self.lba = 0  # next sector (ATA) or 2048-byte block (ATAPI) to move
        self.remaining = 0  # sectors (ATA) or blocks not yet staged (ATAPI)
        self.block = 0  # sectors in the current DRQ block
        self.mult_block = 1  # sectors per DRQ block of this command
        self.lba48 = False  # the command used 48-bit addresses: report them so
        self.bcl = 0  # ATAPI byte count limit
        self.packet_dma = False  # ATAPI: the PACKET command asked for DMA

    def set_signature(self) -> None:
        """Diagnostic-passed code and the device signature (ATA/ATAPI-6 9.12)."""
        self.error = 0x01
        self.nsector = self.sector = 1
        self.lcyl, self.hcyl = PACKET_SIGNATURE if self.cdrom else (0, 0)
        self.select &= 0xF0  # head/LBA 27:24 cleared
        self.status = 0 if self.cdrom or not self.present else DRDY | DSC

    def snapshot(self) -> dict:
        s: dict = {k: getattr(self, k) for k in self.REGS + self.STATE}
        s["buf"] = bytes(self.buf[: self.fill])
        return s

    def restore(self, s: dict) -> None:
        for k in self.REGS + self.STATE:
            setattr(self, k, s[k])
        buf = s["buf"][:BUF_BYTES]
        self.buf[: len(buf)] = buf
        # Never trust indices from outside: keep them inside the buffer.
        self.fill = min(self.fill, len(buf))
        self.end = min(self.end, self.fill)
        self.pos = min(self.pos, self.end)
        self.mult = min(max(self.mult, 0), MAX_MULT)
        self.bcl = min(max(self.bcl, 0), 0xFFFE)
        self.mult_block = min(max(self.mult_block, 1), MAX_MULT)


class Channel:
    """One IDE channel: two drives, the device control register, its bus master."""

    def __init__(self, index: int, drives: list[IdeDriveSpec | None], irq: Callable[[bool], None]) -> None:
        self.index = index
        self.drives = [Drive(drives[0], 0), Drive(drives[1], 1)]
        self.irq = irq
        self.unit = 0
        self.devctl = 0
        self.pending = False  # INTRQ asserted by the selected device
        self.level = False  # what irq() was last told
        self.bm_cmd = self.bm_status = self.bm_prd = 0
        self.clear_dma()

    @property
    def cur(self) -> Drive:
        return self.drives[self.unit]

    @property
    def empty(self) -> bool:
        return not (self.drives[0].present or self.drives[1].present)

    def clear_dma(self) -> None:
        self.dma_unit = -1  # the drive whose DMA command is armed, -1: none
        self.dma_to_image = False
        self.dma_atapi = False
        self.dma_reply = False  # the source is the drive's reply buffer (an ATAPI reply), not the image
        self.dma_offset = self.dma_total = self.dma_done = 0
        self.prd_index = self.prd_off = 0

    @property
    def dma_ready(self) -> bool:
        """A DMA command is armed and the bus master is started (either order)."""
        return self.dma_unit >= 0 and bool(self.bm_cmd & BM_START)

    SNAP = ("unit", "devctl", "pending", "level", "bm_cmd", "bm_status", "bm_prd", "dma_unit",
            "dma_to_image", "dma_atapi", "dma_reply", "dma_offset", "dma_total", "dma_done", "prd_index", "prd_off")

    def snapshot(self) -> dict:
        s: dict = {k: getattr(self, k) for k in self.SNAP}
        s["drives"] = [d.snapshot() for d in self.drives]
        return s

    def restore(self, s: dict) -> None:
        for k in self.SNAP:
            setattr(self, k, s[k])
        for d, ds in zip(self.drives, s["drives"], strict=True):
            d.restore(ds)


def ata_identify(spec: IdeDriveSpec, sectors: int, mult: int, mwdma: int, udma: int, unit: int,
                 peer_present: bool, wce: bool = True) -> list[int]:
    """The 256 words of IDENTIFY DEVICE data (ATA8-ACS 7.16.7, Table 21; the CHS words 1, 3, 6
    and 54-58 that ACS marks obsolete are as ATA/ATAPI-6 8.15 defines them). `unit` (0/1) and
    `peer_present` (the other device of the channel exists) shape word 93."""
    w = [0] * 256
    cyls = min(sectors // (HEADS * SPT), 16383)
    w[0] = 0x0040  # fixed device, not removable
    w[1], w[3], w[6] = cyls, HEADS, SPT
    w[10:20] = atapi.ata_string_words(spec.serial, 20)
    w[23:27] = atapi.ata_string_words("1.0", 8)
    w[27:47] = atapi.ata_string_words(spec.model, 40)
    w[47] = 0x8000 | MAX_MULT
    w[49] = (1 << 11) | (1 << 9) | (1 << 8)  # IORDY, LBA, DMA
    w[50] = 0x4000
    w[51] = 0x0200  # PIO timing mode 2 (obsolete field, read by old drivers)
    w[53] = 0x0007  # words 54-58, 64-70 and 88 valid
    w[54], w[55], w[56] = cyls, HEADS, SPT
    chs = cyls * HEADS * SPT
    w[57], w[58] = chs & 0xFFFF, chs >> 16
    w[59] = (0x100 | mult) if mult else 0
    lba28 = min(sectors, 0x0FFFFFFF)
    w[60], w[61] = lba28 & 0xFFFF, lba28 >> 16
    w[63], w[88] = atapi.dma_mode_words(mwdma, udma)
    w[64] = 0x0003  # PIO modes 3 and 4
    w[65:69] = [120, 120, 120, 120]
    w[80] = 0x007E  # bits 1-6: ATA-1 .. ATA/ATAPI-6 (bits 1-3 are obsolete in ATA8-ACS)
    # NOP (00h, implemented: it aborts, as ATA8-ACS 7.20 requires), look-ahead, write cache, and
    # the Power Management feature set (bit 3: CHECK POWER MODE, IDLE, STANDBY, SLEEP are served). Word
    # 85 repeats them as enabled: NOP and PM cannot be disabled, and a feature that is supported
    # and cannot be disabled "is defined as supported and the bit shall be set to one" (7.16.7.35).
    w[82] = (1 << 14) | (1 << 6) | (1 << 5) | (1 << 3)
    w[83] = (1 << 14) | (1 << 13) | (1 << 12) | (1 << 10)  # FLUSH CACHE (EXT), 48-bit address
    w[84] = 1 << 14
    w[85] = (1 << 14) | (1 << 6) | (int(wce) << 5) | (1 << 3)  # bit 5: the write cache as set now
    w[86] = (1 << 13) | (1 << 12) | (1 << 10)
    w[87] = 1 << 14
    w[93] = atapi.hardware_reset_word(unit, peer_present)
    for i in range(4):
        w[100 + i] = (sectors >> (16 * i)) & 0xFFFF
    return w


def words_to_bytes(words: list[int]) -> bytes:
    return b"".join(x.to_bytes(2, "little") for x in words)


class PiixIde:
    """The IDE function of a PIIX3: legacy ports, config space and BAR4 bus master."""

    kind = "ide"

    def __init__(self, mem: GuestMemory, drives: list[IdeDriveSpec | None],
                 irq14: Callable[[bool], None], irq15: Callable[[bool], None]) -> None:
        if len(drives) != 4:
            raise ValueError("drives: 4 entries, primary master/slave, secondary master/slave")
        self.mem = mem
        self.pci = PciConfigHeader(PIIX3_VENDOR, PIIX3_IDE_DEVICE, IDE_CLASS,
                                   bars=[None, None, None, None, BarSpec(BM_BAR_SIZE, io=True)])
        self.pci.space[0x06:0x08] = (0x0280).to_bytes(2, "little")  # DEVSEL medium, fast back-to-back
        # IDETIM bit 15 per channel: decode enabled, as firmware leaves it for ata_piix.
        self.pci.space[0x41] = self.pci.space[0x43] = 0x80
        self.channels = [Channel(0, drives[0:2], irq14), Channel(1, drives[2:4], irq15)]
        for ch in self.channels:
            for d in ch.drives:
                d.set_signature()
            self._set_bm_capable(ch)

    # -- PCI ------------------------------------------------------------------------------
    def config(self, offset: int, size: int, is_write: bool, value: int) -> int:
        # 0x40-0x4F: a PIIX3 has IDETIM (40-41h primary, 42-43h secondary) and SIDETIM (44h);
        # 45h-4Fh are reserved (the Ultra DMA registers UDMACTL 48h / UDMATIM 4Ah came with the
        # PIIX4). Timing is meaningless here, but firmware writes these and drivers read them
        # back, so the whole range is plain read/write storage.
        if offset >= 0x40 and offset + size <= 0x50 and size in (1, 2, 4):
            if is_write:
                self.pci.space[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
                return 0
            return int.from_bytes(self.pci.space[offset : offset + size], "little")
        if is_write:
            self.pci.write(offset, size, value)
            return 0
        return self.pci.read(offset, size)

    # -- legacy ports ---------------------------------------------------------------------
    def _decode(self, port: int) -> tuple[Channel, int] | None:
        """(channel, register 0-7, or 8 for the control block) for a port of ours."""
        for ch, (base, ctrl) in zip(self.channels, CHANNEL_PORTS, strict=True):
            if base <= port < base + 8:
                return ch, port - base
            if port == ctrl:
                return ch, 8
        return None

    def pio(self, port: int, size: int, is_write: bool, data: bytes, count: int) -> bytes:
        hit = self._decode(port)
        count = max(count, 1)
        if hit is not None and hit[1] == 0 and size in (2, 4):
            # The data register: string I/O moves all count*size bytes at once.
            ch, n = hit[0], size * count
            if is_write:
                self._data_out(ch, bytes(data[:n]).ljust(n, b"\0"))
                return b""
            return self._data_in(ch, n)
        # Everything else is 8 bits wide: a wider access touches consecutive ports, as the
        # ISA bus splits it.
        out = bytearray()
        for i in range(count * size):
            p = port + i % size
            if is_write:
                self._write_port(p, data[i] if i < len(data) else 0)
            else:
                out.append(self._read_port(p))
        return bytes(out)

    def _read_port(self, port: int) -> int:
        hit = self._decode(port)
        if hit is None:
            return 0xFF  # nothing drives the bus
        ch, reg = hit
        if reg == 0:
            return self._data_in(ch, 1)[0]
        d = ch.cur
        if reg in (7, 8):
            # Status of an absent device reads 0 (as QEMU); a status read, not the
            # alternate status, acknowledges the interrupt (ATA/ATAPI-6 7.14 Status register
            # and the Alternate Status register description).
            value = d.status if d.present else 0
            if reg == 7:
                self._set_pending(ch, False)
            return value
        if ch.empty or (not d.present and reg != 6):
            return 0
        hob = bool(ch.devctl & HOB)  # read the "previous" bytes of LBA48 (ATA/ATAPI-6 Device Control)
        names = {1: ("error", "hob_feature"), 2: ("nsector", "hob_nsector"), 3: ("sector", "hob_sector"),
                 4: ("lcyl", "hob_lcyl"), 5: ("hcyl", "hob_hcyl"), 6: ("select", "select")}[reg]
        if reg == 1 and hob:
            return d.hob_feature  # no previous error register: features history, as QEMU
        return getattr(d, names[1] if hob else names[0])

    def _write_port(self, port: int, value: int) -> None:
        hit = self._decode(port)
        if hit is None:
            return
        ch, reg = hit
        if reg == 0:
            self._data_out(ch, bytes([value]))
        elif reg == 7:
            self._command(ch, value)
        elif reg == 8:
            self._write_devctl(ch, value)
        else:
            self._write_taskfile(ch, reg, value)

    def _write_taskfile(self, ch: Channel, reg: int, value: int) -> None:
        # Ignored while the selected device is busy or has data pending (ATA/ATAPI-6 clause 7
        # access restrictions: the host shall not write the command block when BSY or DRQ is set).
        if ch.cur.status & (BSY | DRQ):
            return
        ch.devctl &= ~HOB  # a command block write clears HOB (Device Control register)
        # Both devices of a channel see every write to registers 1-6.
        for d in ch.drives:
            if reg == 6:
                d.select = value
                continue
            name = {1: "feature", 2: "nsector", 3: "sector", 4: "lcyl", 5: "hcyl"}[reg]
            setattr(d, "hob_" + name, getattr(d, name))  # the FIFO of two for LBA48
            setattr(d, name, value)
        if reg == 6:
            ch.unit = 1 if value & DEV_SLAVE else 0

    def _write_devctl(self, ch: Channel, value: int) -> None:
        was = ch.devctl
        ch.devctl = value & (NIEN | SRST | HOB)
        if value & SRST and not was & SRST:
            # Software reset asserted (ATA/ATAPI-6 9.2): both devices go busy, work stops.
            self._abort_dma(ch)
            for d in ch.drives:
                d.end_transfer()
                if d.present:
                    d.status = BSY
            self._set_pending(ch, False)
        elif was & SRST and not value & SRST:
            # Released: signatures in the registers, device 0 selected, no interrupt.
            ch.unit = 0
            for d in ch.drives:
                d.reset_registers()
                d.set_signature()
                d.mult = MAX_MULT
        self._update_irq(ch)

    # -- interrupts -----------------------------------------------------------------------
    def _set_pending(self, ch: Channel, pending: bool) -> None:
        if pending and not ch.devctl & NIEN:
            ch.bm_status |= BMS_INTR  # the bus master latches INTRQ as the device drives it
        ch.pending = pending
        self._update_irq(ch)

    def _raise(self, ch: Channel) -> None:
        self._set_pending(ch, True)

    def _update_irq(self, ch: Channel) -> None:
        level = ch.pending and not ch.devctl & NIEN
        if level != ch.level:
            ch.level = level
            ch.irq(level)

    def irq_levels(self) -> tuple[bool, bool]:
        return self.channels[0].level, self.channels[1].level

    # -- data register --------------------------------------------------------------------
    def _data_in(self, ch: Channel, n: int) -> bytes:
        out = bytearray()
        d = ch.cur
        while len(out) < n and d.status & DRQ and d.xfer in (X_ATA_IN, X_REPLY, X_ATAPI_IN):
            take = min(n - len(out), d.end - d.pos)
            out += d.buf[d.pos : d.pos + take]
            d.pos += take
            if d.pos >= d.end:
                self._in_block_done(ch, d)
        # Reads with no data ready get zeros rather than stale buffer contents.
        return bytes(out.ljust(n, b"\0"))

    def _data_out(self, ch: Channel, data: bytes) -> None:
        d = ch.cur
        done = 0
        while done < len(data) and d.status & DRQ and d.xfer in (X_ATA_OUT, X_PACKET):
            take = min(len(data) - done, d.end - d.pos)
            d.buf[d.pos : d.pos + take] = data[done : done + take]
            d.pos += take
            done += take
            if d.pos >= d.end:
                self._out_block_done(ch, d)
        # Anything written with no DRQ is dropped, as the spec leaves it undefined.

    def _in_block_done(self, ch: Channel, d: Drive) -> None:
        if d.xfer == X_ATA_IN:
            d.remaining -= d.block
            d.lba += d.block
            self._set_address(d, d.lba)
            if d.remaining:
                self._start_ata_in(ch, d)
            else:
                self._complete(ch, d, irq=False)  # ATA/ATAPI-6 9.5: no interrupt after the last block
        elif d.xfer == X_ATAPI_IN:
            self._atapi_next_block(ch, d)
        else:
            self._complete(ch, d, irq=False)  # IDENTIFY (ATA/ATAPI-6 9.5): one block, no final interrupt

    def _out_block_done(self, ch: Channel, d: Drive) -> None:
        if d.xfer == X_PACKET:
            self._packet(ch, d, bytes(d.buf[: atapi.PACKET_SIZE]))
            return
        try:
            d.spec.image.write_from(d.lba * SECTOR, [memoryview(d.buf)[: d.end]])
        except (BlockImageError, OSError):
            self._abort(ch, d)
            return
        d.remaining -= d.block
        d.lba += d.block
        self._set_address(d, d.lba)
        if d.remaining:
            self._start_block(d, min(d.remaining, d.mult_block) * SECTOR, X_ATA_OUT)
            self._raise(ch)  # ATA/ATAPI-6 9.6: an interrupt for each block but the first ...
        elif self._writes_landed(ch, d):
            self._complete(ch, d)  # ... and after the last one

    def _writes_landed(self, ch: Channel, d: Drive) -> bool:
        """Before a write command completes with the write cache disabled, its data must be on
        stable storage: fdatasync (unless the image is already write-through). Aborts and
        returns False if that fails. A replay after a restart syncs again: harmless."""
        if d.wce or d.spec.image.write_through:
            return True
        try:
            d.spec.image.flush()
        except OSError:
            self._abort(ch, d)
            return False
        return True

    def _start_block(self, d: Drive, nbytes: int, xfer: str) -> None:
        """Offer buf[:nbytes] (or ask for it) as one DRQ block."""
        d.xfer = xfer
        d.pos, d.end, d.fill = 0, nbytes, nbytes
        d.block = nbytes // SECTOR
        d.status = DRDY | DSC | DRQ

    def _complete(self, ch: Channel, d: Drive, irq: bool = True) -> None:
        d.end_transfer()
        d.status = DRDY | DSC
        if irq:
            self._raise(ch)

    def _abort(self, ch: Channel, d: Drive, error: int = ABRT) -> None:
        d.end_transfer()
        d.error = error
        d.status = DRDY | DSC | ERR
        self._raise(ch)

    # -- commands -------------------------------------------------------------------------
    def _command(self, ch: Channel, cmd: int) -> None:
        d = ch.cur
        if not d.present or ch.devctl & SRST:
            return  # commands to an absent device are not seen by anyone
        if d.status & (BSY | DRQ) and not (d.cdrom and cmd == CMD_NOP_RESET):
            return  # as QEMU: no new command over a transfer in progress but DEVICE RESET
        if cmd == CMD_DIAGNOSTIC:
            self._diagnostic(ch)
            return
        ch.devctl &= ~HOB
        d.error = 0
        if d.cdrom and cmd not in ATAPI_ALLOWED:
            self._packet_device_refuses(ch, d, cmd)
            return
        handler = self._handlers().get(cmd)
        if handler is None:
            self._abort(ch, d)
        else:
            handler(ch, d, cmd)

    def _packet_device_refuses(self, ch: Channel, d: Drive, cmd: int) -> None:
        """An ATA command a packet device does not take: command aborted; two of them also
        place the PACKET feature set signature.

        IDENTIFY DEVICE: "in the appropriate fields (see 7.11.4)" (ATA8-ACS 7.16.5, 4.3.2), i.e.
        the Table 85 signature: Count 01h, LBA 01h/14h/EBh (ATA/ATAPI-6 likewise says the
        Command Block registers). READ SECTOR(S): "in the LBA field (23:8)" only (7.34.6), so
        Count, LBA Low and Device keep what the host wrote. Everything else (READ SECTOR(S)
        EXT, the writes, READ/WRITE MULTIPLE and DMA, which 4.3.1 prohibits for packet devices)
        is a plain abort with no signature. QEMU also rewrites Count/LBA Low/Device for READ
        SECTOR(S) and puts the signature on READ SECTOR(S) EXT; this follows ACS."""
        if cmd == CMD_IDENTIFY:
            d.set_signature()
        elif cmd == CMD_READ_SECTORS:
            d.lcyl, d.hcyl = PACKET_SIGNATURE
        self._abort(ch, d)

    def _handlers(self) -> dict[int, Callable[[Channel, Drive, int], None]]:
        table: dict[int, Callable[[Channel, Drive, int], None]] = dict.fromkeys(RW_COMMANDS, self._cmd_rw)
        table.update({
            CMD_IDENTIFY: self._cmd_identify, CMD_IDENTIFY_PACKET: self._cmd_identify_packet,
            CMD_SET_MULTIPLE: self._cmd_set_multiple, CMD_SET_FEATURES: self._cmd_set_features,
            CMD_FLUSH: self._cmd_flush, CMD_FLUSH_EXT: self._cmd_flush,
            CMD_READ_NATIVE_MAX: self._cmd_native_max, CMD_READ_NATIVE_MAX_EXT: self._cmd_native_max,
            CMD_CHECK_POWER: self._cmd_check_power, CMD_PACKET: self._cmd_packet,
            CMD_NOP: self._cmd_nop, CMD_NOP_RESET: self._cmd_device_reset,
            CMD_INIT_PARAMS: self._cmd_nodata, CMD_RECALIBRATE: self._cmd_nodata,
        })
        table.update(dict.fromkeys(CMD_POWER, self._cmd_nodata))
        return table

    def _cmd_nodata(self, ch: Channel, d: Drive, cmd: int) -> None:
        self._complete(ch, d)

    def _cmd_identify(self, ch: Channel, d: Drive, cmd: int) -> None:
        peer = ch.drives[1 - d.unit].present
        words = ata_identify(d.spec, d.sectors, d.mult, d.mwdma, d.udma, d.unit, peer, d.wce)
        self._reply(ch, d, words_to_bytes(words))

    def _cmd_identify_packet(self, ch: Channel, d: Drive, cmd: int) -> None:
        if not d.cdrom:
            self._abort(ch, d)
            return
        peer = ch.drives[1 - d.unit].present
        words = atapi.identify_packet_device(d.spec.serial, d.spec.model, d.mwdma, d.udma, d.unit, peer)
        self._reply(ch, d, words_to_bytes(words))

    def _cmd_nop(self, ch: Channel, d: Drive, cmd: int) -> None:
        # NOP (ATA8-ACS 7.20, Table 26): every subcommand ends in command aborted; all fields
        # but Error and Status are kept (7.20.5, Table 114). No command queue to abort here.
        self._abort(ch, d)

    def _reply(self, ch: Channel, d: Drive, data: bytes) -> None:
        """A one-block PIO data-in reply (IDENTIFY): DRQ and an interrupt (ATA/ATAPI-6 9.5)."""
        d.buf[: len(data)] = data
        self._start_block(d, len(data), X_REPLY)
        self._raise(ch)

    def _cmd_set_multiple(self, ch: Channel, d: Drive, cmd: int) -> None:
        n = d.nsector
        if n > MAX_MULT or n & (n - 1):
            self._abort(ch, d)  # a power of two up to word 47, or 0 to disable (as QEMU; ATA8-ACS 7.50)
            return
        d.mult = n
        self._complete(ch, d)

    def _cmd_set_features(self, ch: Channel, d: Drive, cmd: int) -> None:
        # ATA8-ACS 7.47: subcommand in Features (Table 33), transfer mode in Sector Count (Table 34).
        if d.feature == 0x03:
            # Count: transfer type in bits 7:3, mode in 2:0 (Table 34). Only the values Table 34
            # defines and IDENTIFY advertises are taken; the rest abort (as QEMU does for unknown
            # types; 7.16.2: a command the IDENTIFY data says is unsupported is aborted):
            # 00000 000b PIO default; 00000 001b (PIO default, IORDY off) needs word 49 bit 10,
            # which is 0; 00000 010b-111b undefined; 00001 mode: PIO 0-4 (word 64: 3 and 4,
            # and every lower mode, 7.47.5); 00010b retired (single word DMA, word 62 = 0);
            # 00100 mode: Multiword DMA 0-2 (word 63); 01000 mode: Ultra DMA 0-5 (word 88).
            kind, mode = d.nsector >> 3, d.nsector & 7
            if d.nsector == 0x00 or (kind == 0b00001 and mode <= 4):
                d.mwdma = d.udma = -1
            elif kind == 0b00100 and mode <= atapi.MWDMA_MAX:
                d.mwdma, d.udma = mode, -1
            elif kind == 0b01000 and mode <= atapi.UDMA_MAX:
                d.mwdma, d.udma = -1, mode
            else:
                self._abort(ch, d)
                return
        elif d.feature in (0x02, 0x82) and not d.cdrom:
            # Enable/disable the write cache (ATA8-ACS 7.47.4; word 85 bit 5, 7.16.7.35). Disabling
            # it "shall initiate the sequence to flush cache to non-volatile memory before command
            # completion"; from then on a write completes only once it is on stable storage
            # (_writes_landed).
            d.wce = d.feature == 0x02
            if not d.wce and not self._writes_landed(ch, d):
                return
        elif d.feature not in (0x02, 0x82, 0x55, 0xAA, 0x66, 0xCC):
            # look-ahead off/on, revert to defaults off/on: no-ops
            self._abort(ch, d)
            return
        self._complete(ch, d)

    def _cmd_flush(self, ch: Channel, d: Drive, cmd: int) -> None:
        try:
            d.spec.image.flush()
        except OSError:
            self._abort(ch, d)
            return
        self._complete(ch, d)

    def _cmd_native_max(self, ch: Channel, d: Drive, cmd: int) -> None:
        # Last addressable sector; an empty medium says 0 rather than -1. Nothing here
        # divides by the geometry (CVE-2015-6855); CD-ROMs never reach this (ATAPI_ALLOWED).
        last = max(d.sectors - 1, 0)
        if cmd == CMD_READ_NATIVE_MAX:
            last = min(last, 0x0FFFFFFF)
        self._set_address(d, last, lba48=cmd == CMD_READ_NATIVE_MAX_EXT)
        self._complete(ch, d)

    def _cmd_check_power(self, ch: Channel, d: Drive, cmd: int) -> None:
        d.nsector = 0xFF  # active or idle (ATA8-ACS 7.8, Table 82)
        self._complete(ch, d)

    def _cmd_device_reset(self, ch: Channel, d: Drive, cmd: int) -> None:
        if not d.cdrom:
            self._abort(ch, d)
            return
        if ch.dma_unit == d.unit:
            ch.clear_dma()  # its DMA goes with it; end_transfer() below ends its data phase
        d.end_transfer()
        d.set_signature()
        d.sense_key = d.asc = 0
        # DEVICE RESET (ATA8-ACS 7.11; ATA/ATAPI-6 DEVICE RESET command protocol) ends without an
        # interrupt.

    def _diagnostic(self, ch: Channel) -> None:
        # EXECUTE DEVICE DIAGNOSTIC goes to both devices whichever is selected (ATA8-ACS 7.13;
        # ATA/ATAPI-6 9.10).
        self._abort_dma(ch)
        for dr in ch.drives:
            dr.end_transfer()
            dr.set_signature()
        ch.unit = 0
        self._raise(ch)

    # -- READ/WRITE -----------------------------------------------------------------------
    def _address(self, d: Drive, lba48: bool) -> tuple[int, int] | None:
        """(first sector, count) from the task file, or None for a bad CHS address."""
        if lba48:
            lba = (d.hob_hcyl << 40) | (d.hob_lcyl << 32) | (d.hob_sector << 24) | \
                (d.hcyl << 16) | (d.lcyl << 8) | d.sector
            return lba, ((d.hob_nsector << 8) | d.nsector) or 65536
        count = d.nsector or 256
        if d.select & DEV_LBA:
            return ((d.select & 0x0F) << 24) | (d.hcyl << 16) | (d.lcyl << 8) | d.sector, count
        # CHS (as in ATA/ATAPI-6; ATA8-ACS is LBA only), in the fixed geometry of IDENTIFY words 1/3/6.
        cyl, head, sect = (d.hcyl << 8) | d.lcyl, d.select & 0x0F, d.sector
        if sect == 0 or sect > SPT:
            return None
        return (cyl * HEADS + head) * SPT + sect - 1, count

    def _set_address(self, d: Drive, lba: int, lba48: bool | None = None) -> None:
        """Report a sector address in the task file, in the form the command used."""
        if lba48 is None:
            lba48 = d.lba48
        if lba48:
            d.sector, d.lcyl, d.hcyl = lba & 0xFF, (lba >> 8) & 0xFF, (lba >> 16) & 0xFF
            d.hob_sector, d.hob_lcyl, d.hob_hcyl = (lba >> 24) & 0xFF, (lba >> 32) & 0xFF, (lba >> 40) & 0xFF
        elif d.select & DEV_LBA:
            d.sector, d.lcyl, d.hcyl = lba & 0xFF, (lba >> 8) & 0xFF, (lba >> 16) & 0xFF
            d.select = (d.select & 0xF0) | ((lba >> 24) & 0x0F)
        else:
            cyl, rest = divmod(lba, HEADS * SPT)  # constants: never zero
            head, sect = divmod(rest, SPT)
            cyl = min(cyl, 0xFFFF)
            d.sector, d.lcyl, d.hcyl = sect + 1, cyl & 0xFF, cyl >> 8
            d.select = (d.select & 0xF0) | head

    def _cmd_rw(self, ch: Channel, d: Drive, cmd: int) -> None:
        is_write, lba48, how = RW_COMMANDS[cmd]
        if is_write and d.spec.image.readonly:
            self._abort(ch, d)
            return
        if how == "multiple" and d.mult == 0:
            self._abort(ch, d)  # multiple mode disabled (ATA8-ACS 7.30.2, 7.50.3)
            return
        addr = self._address(d, lba48)
        if addr is None or addr[0] + addr[1] > d.sectors:
            self._abort(ch, d, IDNF)  # outside the medium (ATA8-ACS 6.2.4: IDNF)
            return
        d.end_transfer()
        d.lba, d.remaining = addr
        d.lba48 = lba48
        d.mult_block = d.mult if how == "multiple" else 1
        if how == "dma":
            self._arm_dma(ch, d, d.lba * SECTOR, d.remaining * SECTOR, to_image=is_write, is_atapi=False)
        elif is_write:
            self._start_block(d, min(d.remaining, d.mult_block) * SECTOR, X_ATA_OUT)  # ATA/ATAPI-6 9.6: no irq yet
        else:
            self._start_ata_in(ch, d)

    def _start_ata_in(self, ch: Channel, d: Drive) -> None:
        n = min(d.remaining, d.mult_block)
        try:
            d.spec.image.read_into(d.lba * SECTOR, [memoryview(d.buf)[: n * SECTOR]])
        except (BlockImageError, OSError):
            self._abort(ch, d)
            return
        self._start_block(d, n * SECTOR, X_ATA_IN)
        self._raise(ch)

    # -- ATAPI ----------------------------------------------------------------------------
    def _cmd_packet(self, ch: Channel, d: Drive, cmd: int) -> None:
        # ATA8-ACS 7.22.6.1 (ATA/ATAPI-6 PACKET command protocol): DRQ for the 12-byte command
        # packet, C/D = 1, I/O = 0, and no interrupt (IDENTIFY PACKET DEVICE word 0 bits 6:5 = 10b:
        # DRQ within 50 us, ATA8-ACS Table 24).
        d.end_transfer()
        d.packet_dma = bool(d.feature & 0x01)
        d.bcl = (d.hcyl << 8) | d.lcyl
        self._start_block(d, atapi.PACKET_SIZE, X_PACKET)
        d.nsector = IR_COD

    def _packet(self, ch: Channel, d: Drive, cdb: bytes) -> None:
        res = atapi.execute(cdb, d.sectors, (d.sense_key, d.asc), d.spec.model)
        dma = d.packet_dma
        if cdb[0] != atapi.REQUEST_SENSE:
            d.sense_key, d.asc = res.sense_key, res.asc
        else:
            d.sense_key, d.asc = atapi.NO_SENSE, atapi.ASC_NONE
        if res.sense_key:
            self._atapi_error(ch, d, res.sense_key)
            return
        if res.read_blocks and dma:
            d.end_transfer()
            d.status = DRDY | DSC | DRQ
            self._arm_dma(ch, d, res.read_lba * atapi.CD_BLOCK, res.read_blocks * atapi.CD_BLOCK,
                          to_image=False, is_atapi=True)
            return
        if res.data and dma:
            # The host asked for DMA (Features bit 0, ATA8-ACS 7.22.3): a reply (INQUIRY, MODE
            # SENSE...) moves by DMA too, from the reply buffer; a driver waiting on the bus
            # master would never see it offered by PIO.
            d.end_transfer()
            d.buf[: len(res.data)] = res.data
            d.fill = len(res.data)
            self._arm_dma(ch, d, 0, len(res.data), to_image=False, is_atapi=True)
            ch.dma_reply = True
            return
        if not res.data and not res.read_blocks:
            self._atapi_done(ch, d)
            return
        bcl = 0xFFFE if d.bcl == 0xFFFF else d.bcl  # FFFFh reads as FFFEh (ATA8-ACS 7.22.5)
        total = len(res.data) or res.read_blocks * atapi.CD_BLOCK
        # A limit of 0 with data to move: IDENTIFY PACKET DEVICE word 125 is 0000h, so "the
        # device shall return command aborted" (7.17.6.44, 7.22.5 a; QEMU aborts too). A limit
        # of 1 with more than one byte to move leaves no valid byte count (7.22.6.2: at most
        # the limit, not zero, even unless it is the last transfer); the host broke 7.22.5 b
        # (the limit shall be even when the transfer is longer), so abort that as well.
        if bcl == 0 or (bcl == 1 and total > 1):
            self._atapi_error(ch, d, atapi.NO_SENSE)
            return
        d.end_transfer()
        d.bcl = bcl
        if res.data:
            d.buf[: len(res.data)] = res.data
            d.fill, d.remaining = len(res.data), 0
        else:
            d.lba, d.remaining, d.fill = res.read_lba, res.read_blocks, 0
        d.pos = d.end = 0
        d.xfer = X_ATAPI_IN
        self._atapi_next_block(ch, d)

    def _atapi_next_block(self, ch: Channel, d: Drive) -> None:
        """Offer the next DRQ block: from what is staged, or stage up to 8 KiB more."""
        if d.pos >= d.fill:
            if not d.remaining:
                self._atapi_done(ch, d)
                return
            n = min(d.remaining, BUF_BYTES // atapi.CD_BLOCK)
            try:
                d.spec.image.read_into(d.lba * atapi.CD_BLOCK, [memoryview(d.buf)[: n * atapi.CD_BLOCK]])
            except (BlockImageError, OSError):
                self._abort(ch, d)
                return
            d.lba += n
            d.remaining -= n
            d.pos, d.fill = 0, n * atapi.CD_BLOCK
        left = d.fill - d.pos
        # The byte count of a DRQ block (ATA8-ACS 7.22.6.2): at most the limit, never zero,
        # even except for the last block (an odd limit is used as limit - 1 until then; `left`
        # is odd only for the tail of a small reply, staged reads are whole 2048-byte blocks).
        size = left if left <= d.bcl else d.bcl & ~1
        if size == 0:  # a limit below 2 from a restored snapshot: _packet refuses those
            self._atapi_error(ch, d, atapi.NO_SENSE)
            return
        d.end = d.pos + size
        d.lcyl, d.hcyl = size & 0xFF, (size >> 8) & 0xFF
        d.nsector = IR_IO
        d.status = DRDY | DSC | DRQ
        self._raise(ch)

    def _atapi_done(self, ch: Channel, d: Drive) -> None:
        d.end_transfer()
        d.nsector = IR_IO | IR_COD  # status phase
        d.status = DRDY | DSC
        self._raise(ch)

    def _atapi_error(self, ch: Channel, d: Drive, sense_key: int) -> None:
        """End a PACKET command in error (ATA8-ACS Table 115): ABRT, the sense key in Error bits
        7:4 (6.2.8; NO_SENSE for an abort at the ATA level), I/O = C/D = 1, an interrupt."""
        d.end_transfer()
        d.error = (sense_key << 4) | ABRT
        d.nsector = IR_IO | IR_COD
        d.status = DRDY | ERR
        self._raise(ch)

    # -- bus master -----------------------------------------------------------------------
    def bar_access(self, bar: int, offset: int, size: int, is_write: bool, data: bytes) -> bytes:
        if bar != BM_BAR:
            return b"" if is_write else b"\xff" * size
        out = bytearray()
        for i in range(size):
            off = offset + i
            if not 0 <= off < BM_BAR_SIZE:
                out.append(0xFF)
                continue
            ch, reg = self.channels[off >> 3], off & 7
            if is_write:
                self._bm_write(ch, reg, data[i] if i < len(data) else 0)
            else:
                out.append(self._bm_read(ch, reg))
        return b"" if is_write else bytes(out)

    def _bm_read(self, ch: Channel, reg: int) -> int:
        if reg == 0:
            return ch.bm_cmd
        if reg == 2:
            return ch.bm_status
        if reg >= 4:
            return (ch.bm_prd >> (8 * (reg - 4))) & 0xFF
        return 0

    def _bm_write(self, ch: Channel, reg: int, value: int) -> None:
        if reg == 0:
            self._bm_command(ch, value)
        elif reg == 2:
            # Capable bits are plain R/W; error and interrupt are write-1-to-clear.
            keep = ch.bm_status & BMS_ACTIVE
            ch.bm_status = keep | (value & BMS_CAPABLE) | (ch.bm_status & ~value & (BMS_ERROR | BMS_INTR))
        elif reg >= 4:
            shift = 8 * (reg - 4)
            prd = (ch.bm_prd & ~(0xFF << shift)) | (value << shift)
            ch.bm_prd = prd & 0xFFFFFFFC  # dword aligned

    def _bm_command(self, ch: Channel, value: int) -> None:
        value &= BM_START | BM_TO_MEMORY
        if value & BM_START and not ch.bm_cmd & BM_START:
            ch.bm_status |= BMS_ACTIVE
            ch.prd_index = ch.prd_off = 0  # a start begins at the table's first PRD
            ch.dma_done = 0
        elif ch.bm_cmd & BM_START and not value & BM_START:
            # Stop: a transfer not finished is lost (PIIX datasheets, BMICx bit 0). A device
            # still in its DMA data phase would wait for a reset; here its command ends with
            # ABRT and no interrupt, so the guest can also go on with the next command.
            self._abort_dma(ch)
            ch.bm_status &= ~BMS_ACTIVE
        ch.bm_cmd = value
        # The transfer itself runs in work(), outside the trapped access.

    def _set_bm_capable(self, ch: Channel) -> None:
        ch.bm_status |= sum(0x20 << i for i, d in enumerate(ch.drives) if d.present)

    def _arm_dma(self, ch: Channel, d: Drive, offset: int, total: int, to_image: bool, is_atapi: bool) -> None:
        ch.clear_dma()
        ch.dma_unit, ch.dma_offset, ch.dma_total = d.unit, offset, total
        ch.dma_to_image, ch.dma_atapi = to_image, is_atapi
        d.xfer = X_DMA
        d.status = DRDY | DSC | DRQ  # ATA/ATAPI-6 DMA command protocol: DRQ held while data moves

    def _abort_dma(self, ch: Channel) -> None:
        """Drop the channel's DMA; a device still in its DMA data phase (armed, or left
        waiting by a PRD table that ran out) ends its command with ABRT and no interrupt."""
        ch.clear_dma()
        for d in ch.drives:
            if d.present and d.xfer == X_DMA:
                self._dma_command_error(ch, d, irq=False)

    def _dma_command_error(self, ch: Channel, d: Drive, irq: bool) -> None:
        """End a DMA command with ABRT (ATA8-ACS 6.2.1), in the PACKET error form for a packet
        device (Table 115: I/O = C/D = 1)."""
        d.end_transfer()
        d.error = ABRT
        d.status = DRDY | DSC | ERR
        if d.cdrom:
            d.nsector = IR_IO | IR_COD
        if irq:
            self._raise(ch)

    def work_pending(self) -> bool:
        return any(ch.dma_ready for ch in self.channels)

    def work(self) -> bool:
        """Run armed DMA in chunks of at most DMA_CHUNK bytes; True while more remains."""
        for ch in self.channels:
            if ch.dma_ready:
                self._dma_step(ch)
        return self.work_pending()

    def _gather(self, ch: Channel, want: int) -> tuple[list[memoryview], int, int, int, bool] | None:
        """Guest RAM views for up to `want` bytes from the PRD table at the saved position.

        Returns (views, bytes, next index, next offset, end of table reached), or None when
        the table is bad: a PRD or buffer outside guest RAM, or no end bit within a page."""
        idx, off = ch.prd_index, ch.prd_off
        views: list[memoryview] = []
        got = 0
        try:
            while got < want and len(views) < IOV_MAX:
                if idx >= PRD_MAX:
                    return None
                prd = self.mem.slice(ch.bm_prd + 8 * idx, 8)
                addr = int.from_bytes(prd[0:4], "little") & ~1
                word = int.from_bytes(prd[4:8], "little")
                size = (word & 0xFFFE) or 0x10000  # 0 means 64 KiB
                take = min(size - off, want - got)
                views.append(self.mem.slice(addr + off, take))
                got += take
                off += take
                if off == size:
                    idx, off = idx + 1, 0
                    if word & 0x80000000:
                        return views, got, idx, off, True
        except GuestMemoryError:
            return None
        return views, got, idx, off, False

    def _dma_step(self, ch: Channel) -> None:
        want = min(DMA_CHUNK, ch.dma_total - ch.dma_done)
        gathered = self._gather(ch, want)
        if gathered is None:
            self._dma_finish(ch, "bus_error")
            return
        views, got, idx, off, eot = gathered
        d = ch.drives[ch.dma_unit]
        image = d.spec.image
        pos = ch.dma_offset + ch.dma_done
        try:
            if ch.dma_reply:
                reply = memoryview(d.buf)[pos : pos + got]
                for v in views:
                    v[:] = reply[: len(v)]
                    reply = reply[len(v) :]
            elif ch.dma_to_image:
                image.write_from(pos, views)
            else:
                image.read_into(pos, views)
        except (BlockImageError, OSError):
            self._dma_finish(ch, "device_error")
            return
        finally:
            views.clear()  # release the RAM views now, not when the frame dies
        ch.dma_done += got
        ch.prd_index, ch.prd_off = idx, off
        if ch.dma_done >= ch.dma_total:
            self._dma_finish(ch, "exact" if eot else "longer")
        elif eot:
            self._dma_finish(ch, "short")

    def _dma_finish(self, ch: Channel, how: str) -> None:
        """End of a DMA. BM status follows the Interrupt/Active table of Intel's bus-master IDE
        (PIIX4 BMISx points to its Table 15; the ICH datasheets carry the same table, e.g. ICH7
        Table 5-42): "exact" (PRDs as long as the transfer): Interrupt only; "longer": Active
        and Interrupt; "short": neither, Error clear; "bus_error" (a PRD or buffer outside guest
        RAM, or no end of table within a page: a PCI master abort on real hardware): Error, not
        Active, no interrupt; "device_error" (the image failed)."""
        d = ch.drives[ch.dma_unit]
        is_atapi, wrote = ch.dma_atapi, ch.dma_to_image
        ch.clear_dma()
        if how == "bus_error":
            # Error conditions (82801AA 5.14.2.6, ICH7 5.16.2.5; PIIX4 BMISx bit 1: Error on a
            # target or master abort): the controller stops the transfer, clears Active, sets
            # Error and "does not generate an interrupt". The drive cannot see a PCI error and
            # would wait for data until reset; the model ends its command with ABRT, still
            # without an interrupt, so the guest finds the error in the drive registers too
            # and can issue the next command. (QEMU's ide_dma_error aborts and raises INTRQ,
            # which also sets the bus-master Interrupt bit; the datasheets rule that out.)
            ch.bm_status = (ch.bm_status & ~BMS_ACTIVE) | BMS_ERROR
            self._dma_command_error(ch, d, irq=False)
            return
        if how == "device_error":
            # The device fails the command itself: ABRT and its completion interrupt. No PCI
            # error happened, so no Error bit (set only on target/master abort, PIIX4 BMISx).
            ch.bm_status &= ~BMS_ACTIVE
            self._dma_command_error(ch, d, irq=True)
            return
        if how == "short":
            # Interrupt 0, Active 0, Error 0: "the PRD's specified a smaller size than the IDE
            # transfer size" (the Interrupt/Active table; PIIX/PIIX3 require PRDs at least as
            # long as the disk transfer). The device has not got all its data: it stays in its
            # data phase (DRQ, X_DMA), no completion, no interrupt, until the guest stops the
            # bus master (_bm_command) or resets it.
            # (QEMU's ide_dma_cb, "the PRDs were too short", completes the device instead.)
            ch.bm_status &= ~BMS_ACTIVE
            return
        if how == "exact":
            ch.bm_status &= ~BMS_ACTIVE
        if is_atapi:
            self._atapi_done(ch, d)
        else:
            self._set_address(d, (ch.dma_offset + ch.dma_total) // SECTOR)
            if not wrote or self._writes_landed(ch, d):
                self._complete(ch, d)

    # -- snapshot -------------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {"pci": self.pci.snapshot(), "channels": [ch.snapshot() for ch in self.channels]}

    def restore(self, state: dict) -> None:
        """Take a snapshot back; an armed DMA resumes on the next work() call.

        The irq callbacks are not called: the levels are those last published, and the
        host re-drives its lines from irq_levels()."""
        self.pci.restore(state["pci"])
        for ch, s in zip(self.channels, state["channels"], strict=True):
            ch.restore(s)
