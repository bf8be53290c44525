"""The command line and TOML config, in QEMU's spellings, checked before anything starts.

Every error names its option and exits 2 (UsageError); nothing has been started yet.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from broker.layout import MAX_VCPUS
from vcpu.platform import CMDLINE_MAX

MiB = 1 << 20
MIN_RAM = 2 * MiB
MAX_RAM = 16 << 30


class UsageError(Exception):
    """A bad option: the message names it; splitvm exits 2."""


@dataclass
class Machine:
    accel: str | None = None  # None: kvm where it works, else tcg
    ram_size: int = 128 * MiB
    smp: int = 1
    kernel: Path | None = None  # None: the built-in firmware
    append: str = ""
    monitor: str = "none"  # none | stdio
    serial: str = "stdio"  # stdio | none | file:PATH
    serial_log: Path | None = None
    trace: Path | None = None
    run_dir: Path | None = None
    qtest: str | None = None
    name: str = "splitvm"
    devices: list[tuple[str, dict]] = field(default_factory=list)  # -device DRIVER,k=v...
    drives: list = field(default_factory=list)  # broker.drives.Drive, from -drive/-hda../-cdrom


def parse_size(opt: str, text: str) -> int:
    """QEMU's -m: a number with an optional K/M/G/T suffix; a bare number is MiB."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)[bB]?\s*", str(text))
    if not m:
        raise UsageError(f"{opt}: invalid size {text!r} (use e.g. 128M or 1G)")
    num, unit = float(m.group(1)), m.group(2).upper() or "M"
    size = int(num * {"K": 1 << 10, "M": MiB, "G": 1 << 30, "T": 1 << 40}[unit])
    if size < MIN_RAM or size > MAX_RAM:
        raise UsageError(f"{opt}: {text} is out of range (2M to 16G)")
    if size % (2 * MiB):
        raise UsageError(f"{opt}: {text} is not a multiple of 2M")
    return size


def parse_smp(opt: str, text: str) -> int:
    m = re.fullmatch(r"(?:cpus=)?(\d+)", str(text).split(",")[0])
    if not m or not 1 <= int(m.group(1)) <= MAX_VCPUS:
        raise UsageError(f"{opt}: expected a vCPU count from 1 to {MAX_VCPUS}, got {text!r}")
    return int(m.group(1))


def parse_accel(opt: str, text: str) -> str:
    name = str(text).split(",")[0]
    if name not in ("kvm", "tcg", "qtest"):
        raise UsageError(f"{opt}: unknown accelerator {text!r} (kvm, tcg or qtest)")
    return name


def parse_serial(m: Machine, opt: str, text: str) -> None:
    parts = str(text).split(",")
    backend = parts[0]
    if backend == "stdio" or backend == "mon:stdio":
        m.serial = "stdio"
    elif backend == "none" or backend == "null":
        m.serial = "none"
    elif backend.startswith("file:") and len(backend) > 5:
        m.serial = backend
    else:
        raise UsageError(f"{opt}: unsupported serial backend {backend!r} (stdio, none or file:PATH)")
    for p in parts[1:]:
        k, _, v = p.partition("=")
        if k == "logfile" and v:
            m.serial_log = Path(v)
        else:
            raise UsageError(f"{opt}: unknown serial option {p!r} (logfile=PATH)")


def parse_trace(opt: str, text: str) -> Path:
    event, _, path = str(text).partition("=")
    if event != "io":
        raise UsageError(f"{opt}: only the 'io' trace exists (-trace io[=FILE]), got {text!r}")
    return Path(path) if path else Path("splitvm-io.trace")


def parse_monitor(opt: str, text: str) -> str:
    if text not in ("stdio", "none"):
        raise UsageError(f"{opt}: expected stdio or none, got {text!r} (use 'splitvm monitor RUN_DIR' for a socket)")
    return text


DEVICE_DRIVERS = {
    "testdev": {"addr", "id"},
    # front ends of a -drive if=none,id=ID (broker/drives.py attach_drive_devices)
    "virtio-blk-pci": {"drive", "addr", "serial", "id"},
    "ide-hd": {"drive", "bus", "unit", "serial", "id"},
    "ide-cd": {"drive", "bus", "unit", "serial", "id"},
}


def parse_device(opt: str, text: str) -> tuple[str, dict]:
    driver, *props = str(text).split(",")
    if driver not in DEVICE_DRIVERS:
        raise UsageError(f"{opt}: unknown device {driver!r} (known: {', '.join(sorted(DEVICE_DRIVERS))})")
    opts = {}
    for p in props:
        k, eq, v = p.partition("=")
        if not eq or k not in DEVICE_DRIVERS[driver]:
            raise UsageError(f"{opt}: {driver}: unknown property {p!r}")
        opts[k] = v
    if "id" in opts and not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,31}", opts["id"]):
        raise UsageError(f"{opt}: {driver}: id={opts['id']!r} must be a letter then letters, digits, - or _")
    if "addr" in opts:
        try:
            slot = int(opts["addr"].split(".")[0], 16)
        except ValueError:
            slot = -1
        if not 1 <= slot <= 31:
            raise UsageError(f"{opt}: {driver}: addr={opts['addr']} is not a PCI slot 1..1f")
        opts["addr"] = slot
    return driver, opts


def _apply(m: Machine, opt: str, value: object, key: str | None = None) -> None:
    """Apply one option; `opt` is how errors name it (an option, or a config key and file)."""
    key = key or opt.lstrip("-")
    if key == "accel":
        m.accel = parse_accel(opt, value)
    elif key == "enable-kvm":
        m.accel = "kvm"
    elif key in ("m", "memory"):
        m.ram_size = parse_size(opt, value)
    elif key == "smp":
        m.smp = parse_smp(opt, value)
    elif key == "kernel":
        p = Path(str(value)).expanduser()
        if not p.is_file():
            raise UsageError(f"{opt}: {value}: no such file")
        m.kernel = p
    elif key == "append":
        m.append = str(value)
        if len(m.append.encode()) >= CMDLINE_MAX:  # the firmware would cut it short, silently
            raise UsageError(f"{opt}: {len(m.append.encode())} bytes; the firmware takes at most {CMDLINE_MAX - 1}")
    elif key == "monitor":
        m.monitor = parse_monitor(opt, value)
    elif key == "serial":
        parse_serial(m, opt, value)
    elif key == "nographic":
        if value is not True and value is not None:
            raise UsageError(f"{opt}: takes no value")
    elif key == "trace":
        m.trace = parse_trace(opt, value)
    elif key == "run-dir":
        m.run_dir = Path(str(value))
    elif key == "qtest":
        if not str(value).startswith("unix:") or len(str(value)) == 5:
            raise UsageError(f"{opt}: expected unix:PATH, got {value!r}")
        m.qtest = str(value)
    elif key == "name":
        m.name = str(value)
    elif key == "drive":
        from broker.drives import parse_drive

        m.drives.append(parse_drive(opt, value))
    elif key in ("hda", "hdb", "hdc", "hdd", "cdrom"):
        from broker.drives import shorthand

        m.drives.append(shorthand("-" + key, str(value)))
    elif key == "device":
        m.devices.append(parse_device(opt, value))
    else:
        raise UsageError(f"{opt}: unknown option")


FLAGS = {"-nographic", "-enable-kvm"}
TOML_KEYS = {"accel", "memory", "m", "smp", "kernel", "append", "monitor", "serial", "nographic", "trace",
             "run-dir", "name", "qtest", "device", "drive", "hda", "hdb", "hdc", "hdd", "cdrom"}


def load_config(path: Path, m: Machine) -> None:
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"--config: {path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"--config: {path}: {e}") from None
    machine = data.get("machine", data)
    for key, value in machine.items():
        if key not in TOML_KEYS:
            raise UsageError(f"--config: {path}: unknown key {key!r}")
        if key == "nographic":
            continue
        for v in value if isinstance(value, list) and key in ("device", "drive") else [value]:
            _apply(m, f"{key} (in {path})", v, key)


def parse_args(argv: list[str]) -> Machine:
    m = Machine()
    i = 0
    while i < len(argv):
        opt = argv[i]
        if opt in ("--config", "-config"):
            if i + 1 >= len(argv):
                raise UsageError(f"{opt}: needs a file")
            load_config(Path(argv[i + 1]), m)
            i += 2
            continue
        if opt in FLAGS:
            _apply(m, opt, True)
            i += 1
            continue
        if not opt.startswith("-") or opt == "-":
            raise UsageError(f"{opt}: unexpected argument")
        name = opt[2:] if opt.startswith("--") else opt[1:]
        if "=" in name and opt.startswith("--"):
            name, value = name.split("=", 1)
            _apply(m, "-" + name, value)
            i += 1
            continue
        if i + 1 >= len(argv):
            raise UsageError(f"-{name}: needs a value")
        _apply(m, "-" + name, argv[i + 1])
        i += 2
    from broker.drives import assign_ide_indexes, attach_drive_devices, name_drives

    m.devices = attach_drive_devices(m.drives, m.devices)
    name_drives(m.drives, assign_ide_indexes(m.drives))
    ids = [o["id"] for _d, o in m.devices if "id" in o] + [d.device_id for d in m.drives if d.device_id]
    if len(ids) != len(set(ids)) or "serial0" in ids:
        raise UsageError("-device: two devices with the same id")
    slots = [o["addr"] for _d, o in m.devices if "addr" in o] + [d.pci_slot for d in m.drives if d.pci_slot]
    if len(slots) != len(set(slots)):
        raise UsageError("-device: two devices at the same PCI slot")
    if m.accel == "qtest" and not m.qtest:
        raise UsageError("-accel qtest: needs -qtest unix:PATH (the test script's socket)")
    return m
