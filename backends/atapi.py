"""ATAPI (SCSI MMC over the ATA PACKET command) for the emulated IDE CD-ROM.

Sans-I/O and stateless: `execute()` takes a 12-byte command packet, the medium's size
and the pending sense, and says what to do: a small reply (bounded, built here), a read
of 2048-byte blocks from the image (done by ide.py, which owns the transfer buffer and
DMA), nothing, or CHECK CONDITION with a sense key. Every field of the packet is taken
as hostile: lengths are clamped to the reply actually built (CVE-2020-29443) and no
reply is bigger than MAX_REPLY (CVE-2015-5154: the transfer buffer cannot overflow).

Command sets: SPC-3 (T10/1416-D rev 23: INQUIRY, REQUEST SENSE, TEST UNIT READY, MODE
SENSE(10)), SBC/MMC-3 (T10/1363-D rev 10g: READ CAPACITY, READ(10)/(12), READ TOC/PMA/ATIP).
Packet transport: ATA8-ACS 7.22 (PACKET) and the ATA/ATAPI-6 PACKET command protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

CD_BLOCK = 2048
PACKET_SIZE = 12
MAX_REPLY = 512  # the largest small reply built here; ide.py's buffer is 8 KiB

# Sense keys and additional sense codes (SPC-3 r23 4.5.6, tables 27 and 28).
NO_SENSE, NOT_READY, ILLEGAL_REQUEST, UNIT_ATTENTION = 0x0, 0x2, 0x5, 0x6
ASC_NONE = 0x00
ASC_INVALID_OPCODE = 0x20
ASC_LBA_OUT_OF_RANGE = 0x21
ASC_INVALID_FIELD = 0x24

# Operation codes.
TEST_UNIT_READY, REQUEST_SENSE, INQUIRY = 0x00, 0x03, 0x12
START_STOP_UNIT, PREVENT_ALLOW = 0x1B, 0x1E
READ_CAPACITY, READ_10, READ_12 = 0x25, 0x28, 0xA8
READ_TOC, MODE_SENSE_10 = 0x43, 0x5A

MODE_PAGE_CAPABILITIES, MODE_PAGE_ALL = 0x2A, 0x3F


@dataclass
class AtapiResult:
    """What a packet asks of the drive. sense_key != 0 means CHECK CONDITION."""

    data: bytes = b""  # a small reply, already cut to the allocation length
    read_lba: int = 0  # a medium read: first 2048-byte block ...
    read_blocks: int = 0  # ... and how many
    sense_key: int = NO_SENSE
    asc: int = ASC_NONE


def check(sense_key: int, asc: int) -> AtapiResult:
    return AtapiResult(sense_key=sense_key, asc=asc)


def execute(cdb: bytes, blocks: int, sense: tuple[int, int], model: str) -> AtapiResult:
    """Run one packet against a medium of `blocks` 2048-byte blocks.

    `sense` is the (key, asc) left by the previous command, for REQUEST SENSE."""
    cdb = bytes(cdb[:PACKET_SIZE]).ljust(PACKET_SIZE, b"\0")
    op = cdb[0]
    if op in (TEST_UNIT_READY, START_STOP_UNIT, PREVENT_ALLOW):
        return AtapiResult()  # the medium is always present and locked in
    if op == REQUEST_SENSE:
        return AtapiResult(data=_cut(sense_data(*sense), cdb[4]))
    if op == INQUIRY:
        return _inquiry(cdb, model)
    if op == READ_CAPACITY:
        last = max(blocks - 1, 0)  # an empty medium reports block 0, never -1
        return AtapiResult(data=last.to_bytes(4, "big") + CD_BLOCK.to_bytes(4, "big"))
    if op == READ_10:
        return _read(int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big"), blocks)
    if op == READ_12:
        return _read(int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[6:10], "big"), blocks)
    if op == MODE_SENSE_10:
        return _mode_sense(cdb)
    if op == READ_TOC:
        return _read_toc(cdb, blocks)
    return check(ILLEGAL_REQUEST, ASC_INVALID_OPCODE)


def _cut(reply: bytes, alloc: int) -> bytes:
    # The guest's allocation length only ever shortens a reply (SPC-3 4.3.4.6).
    return reply[: min(alloc, len(reply), MAX_REPLY)]


def sense_data(key: int, asc: int) -> bytes:
    """Fixed-format sense data, 18 bytes (SPC-3 4.5.3)."""
    out = bytearray(18)
    out[0] = 0x70  # current error, fixed format
    out[2] = key & 0x0F
    out[7] = 10  # additional sense length
    out[12] = asc & 0xFF
    return bytes(out)


def _inquiry(cdb: bytes, model: str) -> AtapiResult:
    if cdb[1] & 0x01:  # EVPD pages are not offered
        return check(ILLEGAL_REQUEST, ASC_INVALID_FIELD)
    out = bytearray(36)  # standard INQUIRY data (SPC-3 6.4.2)
    out[0] = 0x05  # peripheral device type: CD/DVD
    out[1] = 0x80  # removable medium
    out[2] = 0x00  # no SCSI version claimed: ATAPI (MMC) device
    # ATAPI version 2 in bits 7:4 and response data format 1, as ATAPI drives (and QEMU) report;
    # SPC-3 6.4.2 reads bit 5 as NORMACA and asks for response data format 2.
    out[3] = 0x21
    out[4] = len(out) - 5
    out[8:16] = b"SPLITVM "
    out[16:32] = model.encode("ascii", "replace")[:16].ljust(16)
    out[32:36] = b"1.0 "
    return AtapiResult(data=_cut(bytes(out), cdb[4]))


def _read(lba: int, count: int, blocks: int) -> AtapiResult:
    if lba + count > blocks:  # Python ints: no wrap-around to pass this check
        return check(ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE)
    return AtapiResult(read_lba=lba, read_blocks=count)


def _mode_sense(cdb: bytes) -> AtapiResult:
    page = cdb[2] & 0x3F
    alloc = int.from_bytes(cdb[7:9], "big")
    if page not in (MODE_PAGE_CAPABILITIES, MODE_PAGE_ALL):
        return check(ILLEGAL_REQUEST, ASC_INVALID_FIELD)
    # CD capabilities and mechanical status page 2Ah (MMC-3 6.3.11), minimal: reads CD-ROM,
    # tray loading mechanism, locked. Page length 12h (20 bytes): shorter than MMC-3's page.
    caps = bytearray(20)
    caps[0], caps[1] = MODE_PAGE_CAPABILITIES, len(caps) - 2
    caps[2] = 0x00  # reads CD-R/RW: no
    caps[6] = 0x2B  # lock, lock state, eject, tray loading mechanism (bits 0,1,3,5)
    caps[8:10] = (706).to_bytes(2, "big")  # max read speed kB/s (4x), obsolete but read
    caps[12:14] = (2).to_bytes(2, "big")  # buffer size KiB
    header = bytearray(8)  # mode parameter header(10), no block descriptors
    header[0:2] = (len(header) - 2 + len(caps)).to_bytes(2, "big")
    return AtapiResult(data=_cut(bytes(header + caps), alloc))


def _read_toc(cdb: bytes, blocks: int) -> AtapiResult:
    msf = bool(cdb[1] & 0x02)
    fmt = cdb[9] >> 6 or (cdb[2] & 0x0F)
    alloc = int.from_bytes(cdb[7:9], "big")
    if fmt != 0 or msf:  # only the LBA form of format 0000b (MMC-3 5.23, READ TOC/PMA/ATIP)
        return check(ILLEGAL_REQUEST, ASC_INVALID_FIELD)
    # One data track starting at LBA 0, then the lead-out at the end of the medium.
    out = bytearray(4)
    out[2], out[3] = 1, 1  # first and last track
    out += bytes([0, 0x14, 1, 0]) + (0).to_bytes(4, "big")  # ADR 1, data track 1
    out += bytes([0, 0x14, 0xAA, 0]) + blocks.to_bytes(4, "big")  # lead-out
    out[0:2] = (len(out) - 2).to_bytes(2, "big")
    return AtapiResult(data=_cut(bytes(out), alloc))


def ata_string_words(text: str, nbytes: int) -> list[int]:
    """An IDENTIFY string field: ASCII, space padded, the first character of each pair
    in the high byte of its word (ATA/ATAPI-6 8.15, words 10-19, 23-26, 27-46: byte-swapped)."""
    raw = text.encode("ascii", "replace")[:nbytes].ljust(nbytes)
    return [(raw[i] << 8) | raw[i + 1] for i in range(0, nbytes, 2)]


# The DMA modes advertised (all of 0..max). UDMA in word 88 behind a PIIX3, which has no Ultra
# DMA (PIIX4 brought it): IDENTIFY describes the drive, not the host, and a real UDMA drive on a
# PIIX3 reports the same; the host picks the mode with SET FEATURES 03h (ATA8-ACS 7.47.5) and a
# PIIX3 driver (Linux ata_piix, for one) never picks UDMA. QEMU's PIIX3 IDE drives advertise
# UDMA 0-5 too.
MWDMA_MAX, UDMA_MAX = 2, 5


def dma_mode_words(mwdma: int, udma: int) -> tuple[int, int]:
    """IDENTIFY words 63 and 88: supported modes in the low byte, the selected one above."""
    w63 = ((1 << (MWDMA_MAX + 1)) - 1) | ((1 << (8 + mwdma)) if mwdma >= 0 else 0)
    w88 = ((1 << (UDMA_MAX + 1)) - 1) | ((1 << (8 + udma)) if udma >= 0 else 0)
    return w63, w88


def hardware_reset_word(unit: int, peer_present: bool) -> int:
    """IDENTIFY (PACKET) DEVICE word 93, the hardware reset result (ATA8-ACS Table 21 and
    7.16.7.41; 7.17.6.38 gives packet devices the same word).

    Device 0 fills bits 7:0 and clears 12:8, device 1 the reverse. Both report that their
    number came from "some other method" (11b: the VM configuration, neither jumper nor CSEL)
    and that they passed diagnostics; device 0 saw DASP- and PDIAG- only if device 1 exists.
    Bit 6 stays 0: device 0 never answers for an absent device 1 (its registers read 0)."""
    w = (1 << 14) | (1 << 13)  # 14: shall be one; 13: CBLID- above ViH (80-conductor cable)
    if unit == 0:
        w |= 1 | (0b11 << 1) | (1 << 3)  # 0: shall be one; 2:1 numbered how; 3: passed diagnostics
        if peer_present:
            w |= (1 << 5) | (1 << 4)  # device 1 asserted DASP- (present) and PDIAG- (passed)
    else:
        w |= (1 << 8) | (0b11 << 9) | (1 << 11)  # 8: shall be one; 10:9 numbered how; 11: PDIAG-
    return w


def identify_packet_device(serial: str, model: str, mwdma: int, udma: int, unit: int,
                           peer_present: bool) -> list[int]:
    """The 256 words of IDENTIFY PACKET DEVICE data (ATA8-ACS 7.17.6, Table 24).

    `mwdma`/`udma`: the selected mode (-1 if none), reported in words 63 and 88; `unit` and
    `peer_present` (the other device of the channel exists) for word 93."""
    w = [0] * 256
    # ATAPI device (15:14 = 10), CD-ROM (12:8 = 5), removable (7), 50 us DRQ (6:5 = 10).
    w[0] = (2 << 14) | (5 << 8) | (1 << 7) | (2 << 5)
    w[10:20] = ata_string_words(serial, 20)
    w[23:27] = ata_string_words("1.0", 8)
    w[27:47] = ata_string_words(model, 40)
    w[49] = (1 << 11) | (1 << 9) | (1 << 8)  # IORDY, bit 9 (shall be one), DMA
    w[53] = 0x0006  # words 64-70 and 88 valid
    w[63], w[88] = dma_mode_words(mwdma, udma)
    w[64] = 0x0003  # PIO modes 3 and 4
    w[65:69] = [120, 120, 120, 120]
    w[71], w[72] = 30, 30  # typical release/service times (obsolete in ATA8-ACS)
    w[80] = 0x7E  # bits 1-6: ATA-1 .. ATA/ATAPI-6 (bits 1-3 are obsolete in ATA8-ACS)
    w[93] = hardware_reset_word(unit, peer_present)  # bits 15:13 mandatory (7.17.6.38)
    # Word 125 = 0: a PACKET command that moves data with a byte count limit of 0 is aborted
    # (ATA8-ACS 7.17.6.44, 7.22.5 a); ide.py does so.
    w[125] = 0
    return w
