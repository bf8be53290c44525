"""-drive and its shorthands (-hda..-hdd, -cdrom), checked and opened before the guest starts.

QEMU's spelling: -drive file=PATH[,if=ide|virtio|none][,index=N][,media=disk|cdrom]
[,format=raw][,readonly=on][,cache=writeback|none|writethrough|directsync|unsafe][,serial=S][,id=ID]
(cache= as QEMU means it: see backends/block.py), and for if=none,id=ID the front ends
-device virtio-blk-pci,drive=ID[,addr=N] and -device ide-hd|ide-cd,drive=ID[,bus=ide.N,unit=M].
Images are opened and locked here, by the broker, which holds them for the VM's life
and hands the descriptors to the backends: a backend's death never drops a lock.
Locks follow QEMU's rule: one writer, or any number of readers (flock, on the whole file).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from backends.block import CACHE_MODES, DIRECT_MODES
from broker.options import UsageError

IDE_MAX = 4
DISK_SECTOR, CD_SECTOR = 512, 2048
QCOW_MAGIC = b"QFI\xfb"
VMDK_MAGIC = b"KDMV"
VDI_SIG = b"<<< "

BOOLS = {"on": True, "off": False, "yes": True, "no": False, "true": True, "false": False}


@dataclass
class Drive:
    file: Path
    interface: str = "ide"  # ide | virtio | none (attached by a -device, or not at all)
    index: int | None = None
    media: str = "disk"
    readonly: bool = False
    cache: str = "writeback"
    serial: str = ""
    id: str = ""  # QEMU's drive id; by default ide0-hd0 / ide1-cd0 / virtio0, as QEMU names them
    opt: str = "-drive"
    fd: int = -1
    pci_slot: int | None = None  # virtio: -device virtio-blk-pci,addr=
    device_id: str = ""  # -device ...,id=: names the backend (as for testdev)

    def default_serial(self) -> str:
        """Ten digits from the image's path: the same disk shows the same serial every boot."""
        digest = hashlib.sha256(str(self.file.resolve()).encode()).digest()
        return f"{int.from_bytes(digest[:8], 'little') % 10**10:010d}"

    def as_backend_option(self) -> dict:
        name = self.file.name
        return {
            "fd": self.fd, "media": self.media, "readonly": self.readonly,
            "serial": self.serial or f"SV{self.default_serial()}",
            "model": f"SPLITVM {'DVD-ROM' if self.media == 'cdrom' else 'HARDDISK'}",
            "sector_size": CD_SECTOR if self.media == "cdrom" else DISK_SECTOR, "file": name, "cache": self.cache,
            "id": self.id, "path": str(self.file.resolve()),
        }


def parse_drive(opt: str, text: str) -> Drive:
    props: dict[str, str] = {}
    for part in str(text).split(","):
        k, eq, v = part.partition("=")
        if not eq:
            raise UsageError(f"{opt}: expected KEY=VALUE, got {part!r}")
        if k in props:
            raise UsageError(f"{opt}: {k}= given twice")
        props[k] = v
    known = {"file", "if", "index", "media", "format", "readonly", "cache", "serial", "id"}
    for k in props:
        if k not in known:
            raise UsageError(f"{opt}: unknown property {k!r} (known: {', '.join(sorted(known))})")
    if not props.get("file"):
        raise UsageError(f"{opt}: needs file=PATH")
    d = Drive(Path(props["file"]).expanduser(), opt=opt)
    d.interface = props.get("if", "ide")
    if d.interface not in ("ide", "virtio", "none"):
        raise UsageError(f"{opt}: if={d.interface} is not supported (ide, virtio or none)")
    if "index" in props:
        if not props["index"].isdigit():
            raise UsageError(f"{opt}: index={props['index']} is not a number")
        d.index = int(props["index"])
    d.media = props.get("media", "disk")
    if d.media not in ("disk", "cdrom"):
        raise UsageError(f"{opt}: media={d.media} (disk or cdrom)")
    if d.media == "cdrom" and d.interface == "virtio":
        raise UsageError(f"{opt}: media=cdrom needs if=ide")
    fmt = props.get("format", "raw")
    if fmt != "raw":
        raise UsageError(f"{opt}: format={fmt} is not supported, only raw: "
                         f"convert with  qemu-img convert -O raw {d.file} {d.file.with_suffix('.raw')}")
    ro = props.get("readonly", "off")
    if ro not in BOOLS:
        raise UsageError(f"{opt}: readonly={ro} (on or off)")
    d.readonly = BOOLS[ro] or d.media == "cdrom"
    d.cache = props.get("cache", "writeback")
    if d.cache not in CACHE_MODES:
        raise UsageError(f"{opt}: cache={d.cache} (one of {', '.join(CACHE_MODES)})")
    d.id = props.get("id", "")
    if d.id and not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", d.id):
        raise UsageError(f"{opt}: id={d.id} (a letter, then letters, digits, '-', '.', '_')")
    d.serial = check_serial(opt, props.get("serial", ""))
    return d


def check_serial(opt: str, serial: str) -> str:
    """What IDENTIFY words 10-19 and virtio GET_ID can carry: 20 printable ASCII characters."""
    if len(serial) > 20 or not all(32 < ord(c) < 127 for c in serial):
        raise UsageError(f"{opt}: serial= is at most 20 printable characters")
    return serial


def shorthand(opt: str, path: str) -> Drive:
    """-hda..-hdd and -cdrom, as QEMU spells them."""
    if opt == "-cdrom":
        return Drive(Path(path).expanduser(), "ide", 2, "cdrom", True, opt=opt)
    return Drive(Path(path).expanduser(), "ide", "abcd".index(opt[-1]), "disk", opt=opt)


# QEMU's front ends for a -drive if=none,id=ID: -device DRIVER,drive=ID[,...] (their
# properties are checked with the other -device drivers', broker/options.py DEVICE_DRIVERS).
DRIVE_DEVICES = ("virtio-blk-pci", "ide-hd", "ide-cd")


def attach_drive_devices(drives: list[Drive], devices: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """Give each `-device virtio-blk-pci|ide-hd|ide-cd,drive=ID` its if=none drive, as QEMU
    does, and return the other -device entries. The attached drives move to the end of the
    list, in -device order (the order their PCI slots and guest names follow)."""
    by_id = {d.id: d for d in drives if d.id}
    rest: list[tuple[str, dict]] = []
    attached: list[Drive] = []
    for driver, o in devices:
        if driver not in DRIVE_DEVICES:
            rest.append((driver, o))
            continue
        opt = f"-device {driver}"
        d = by_id.get(o.get("drive", ""))
        if d is None:
            raise UsageError(f"{opt}: needs drive=ID of a -drive if=none,id=ID" if "drive" not in o
                             else f"{opt}: drive={o['drive']}: no -drive has that id")
        if d.interface != "none" or d in attached:
            raise UsageError(f"{opt}: drive={d.id} is already in use "
                             + ("(by another -device)" if d in attached else f"(it has if={d.interface}; use if=none)"))
        if driver == "virtio-blk-pci":
            if d.media == "cdrom":
                raise UsageError(f"{opt}: drive={d.id} is media=cdrom: use -device ide-cd")
            d.interface, d.pci_slot = "virtio", o.get("addr")
        else:
            d.interface = "ide"
            if driver == "ide-cd":
                d.media, d.readonly = "cdrom", True
            elif d.media == "cdrom":
                raise UsageError(f"{opt}: drive={d.id} is media=cdrom: use -device ide-cd")
            if "bus" in o or "unit" in o:
                bus, unit = o.get("bus", "ide.0"), o.get("unit", "0")
                if bus not in ("ide.0", "ide.1") or unit not in ("0", "1"):
                    raise UsageError(f"{opt}: bus={bus} unit={unit} (bus ide.0 or ide.1, unit 0 or 1)")
                d.index = 2 * int(bus[-1]) + int(unit)
        if "serial" in o:
            d.serial = check_serial(opt, o["serial"])
        d.opt = opt
        d.device_id = o.get("id", "")
        attached.append(d)
    drives[:] = [d for d in drives if d not in attached] + attached
    return rest


def name_drives(drives: list[Drive], ide: list[Drive | None]) -> None:
    """Give each drive without id= QEMU's default one; two drives may not share an id."""
    for i, d in enumerate(ide):
        if d is not None and not d.id:
            d.id = f"ide{i // 2}-{'cd' if d.media == 'cdrom' else 'hd'}{i % 2}"
    for n, d in enumerate(d for d in drives if d.interface == "virtio"):
        if not d.id:
            d.id = f"virtio{n}"
    for n, d in enumerate(d for d in drives if d.interface == "none"):
        if not d.id:
            d.id = f"none{n}"
    seen: set[str] = set()
    for d in drives:
        if d.id in seen:
            raise UsageError(f"{d.opt}: id={d.id} is already used by another drive")
        seen.add(d.id)


def assign_ide_indexes(drives: list[Drive]) -> list[Drive | None]:
    """Place IDE drives at 0..3 (primary master/slave, secondary master/slave)."""
    slots: list[Drive | None] = [None] * IDE_MAX
    for d in drives:
        if d.interface != "ide" or d.index is None:
            continue
        if d.index >= IDE_MAX:
            raise UsageError(f"{d.opt}: index={d.index}: IDE has 4 positions, 0 to 3")
        if slots[d.index] is not None:
            raise UsageError(f"{d.opt}: IDE index {d.index} is already taken by {slots[d.index].file}")
        slots[d.index] = d
    for d in drives:
        if d.interface == "ide" and d.index is None:
            if None not in slots:
                raise UsageError(f"{d.opt}: {d.file}: at most 4 IDE drives")
            d.index = slots.index(None)
            slots[d.index] = d
    return slots


def check_image(d: Drive) -> None:
    """Everything that can be known before opening: exists, readable, a raw image of a sane size."""
    if not d.file.is_file():
        raise UsageError(f"{d.opt}: {d.file}: no such file")
    if not os.access(d.file, os.R_OK) or (not d.readonly and not os.access(d.file, os.W_OK)):
        raise UsageError(f"{d.opt}: {d.file}: permission denied" + ("" if d.readonly else " (readonly=on?)"))
    size = d.file.stat().st_size
    sector = CD_SECTOR if d.media == "cdrom" else DISK_SECTOR
    if size < sector:
        raise UsageError(f"{d.opt}: {d.file}: {size} bytes is too small for a {d.media} (at least {sector})")
    with open(d.file, "rb") as f:
        head = f.read(4)
        if d.cache in DIRECT_MODES:  # leave nothing of the image in the page cache (readahead)
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if head in (QCOW_MAGIC, VMDK_MAGIC):
        raise UsageError(f"{d.opt}: {d.file} is a {'qcow2' if head == QCOW_MAGIC else 'vmdk'} image, not raw: "
                         f"convert with  qemu-img convert -O raw {d.file} {d.file.with_suffix('.raw')}")


def open_drive(d: Drive) -> int:
    """Open and lock the image; the broker keeps the descriptor for the VM's life."""
    flags = (os.O_RDONLY if d.readonly else os.O_RDWR) | os.O_CLOEXEC
    if d.cache in DIRECT_MODES:
        flags |= os.O_DIRECT  # backends/block.py: what this means and how misaligned requests go
    if d.cache in ("writethrough", "directsync") and not d.readonly:
        flags |= os.O_DSYNC  # every completed write is on stable storage
    try:
        fd = os.open(d.file, flags)
    except OSError as e:
        if e.errno == errno.EINVAL and flags & os.O_DIRECT:
            raise UsageError(f"{d.opt}: {d.file}: this file system does not support O_DIRECT (cache={d.cache}); "
                             f"use cache=writeback or cache=writethrough") from None
        raise UsageError(f"{d.opt}: {d.file}: {e.strerror}") from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if d.readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        who = "is open for writing elsewhere" if d.readonly else "is in use by another process"
        kind = "shared" if d.readonly else "write"
        raise UsageError(f"{d.opt}: {d.file} {who} (failed to get a {kind} lock)") from None
    d.fd = fd
    return fd


def open_drives(drives: list[Drive]) -> None:
    """Check and open every drive; on any error close those already opened."""
    opened: list[int] = []
    try:
        for d in drives:
            check_image(d)
        seen: dict[tuple[int, int], Drive] = {}
        for d in drives:
            st = d.file.stat()
            key = (st.st_dev, st.st_ino)
            if key in seen and not (d.readonly and seen[key].readonly):
                raise UsageError(f"{d.opt}: {d.file} is already used by {seen[key].opt} (one writer per image)")
            seen[key] = d
            opened.append(open_drive(d))
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise
