"""The human monitor, in the style of QEMU's HMP; every command also as JSON.

Text: `info backends`. JSON: {"execute": "info backends"} -> {"return": ...} or
{"error": "..."}; the return value is the structured data the text is made from.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from broker.layout import BAR_IO, BAR_MEM

if TYPE_CHECKING:
    from broker.supervisor import Supervisor

HELP = """\
help                          this list
info backends                 name, kind, pid, state, restarts, requests served, all-ones completions
info pci                      PCI functions, their IDs, IRQ and BARs
info exits                    trapped accesses per device: count, median and p99 round trip (us)
info block                    drives: id, image, format, cache mode, which device and guest name
backend kill|stop|cont|restart NAME
                              SIGKILL (the supervisor restarts it), SIGSTOP, SIGCONT, fresh restart
quit                          end the VM"""

CLASS_NAMES = {
    0x0600: "Host bridge", 0x0601: "ISA bridge", 0x0101: "IDE controller", 0x0200: "Ethernet controller",
    0x0100: "SCSI controller", 0x0500: "RAM controller", 0x00FF: "Class 00ff", 0xFF00: "Class ff00",
}


class MonitorQuit(Exception):
    """`quit`: the caller ends the VM after replying."""


def _pci_functions(sup: Supervisor) -> list[dict]:
    from vcpu.router import host_bridge

    hb = host_bridge()
    funcs = [{"bdf": 0, "config": bytes(hb.space), "bars": [], "id": "", "irq": None}]
    for b in sup.backends.values():
        p = b.page.ptr
        if p.pci_bdf == 0xFFFFFFFF:
            continue
        bars = []
        for i in range(6):
            bar = p.bars[i]
            if bar.kind in (BAR_IO, BAR_MEM):
                bars.append({"index": i, "io": bar.kind == BAR_IO, "addr": int(bar.addr), "size": int(bar.size)})
        funcs.append({"bdf": int(p.pci_bdf), "config": bytes(p.pci_config), "bars": bars, "id": b.name,
                      "irq": int(p.irq)})
    return sorted(funcs, key=lambda f: f["bdf"])


def info_pci_text(funcs: list[dict]) -> str:
    lines = []
    for f in funcs:
        c = f["config"]
        vendor, device = int.from_bytes(c[0:2], "little"), int.from_bytes(c[2:4], "little")
        cls = int.from_bytes(c[0x0A:0x0C], "little")
        bdf = f["bdf"]
        lines.append(f"  Bus {bdf >> 8:2d}, device {(bdf >> 3) & 31:3d}, function {bdf & 7}:")
        lines.append(f"    {CLASS_NAMES.get(cls, f'Class {cls:04x}')}: PCI device {vendor:04x}:{device:04x}")
        if c[0x3D]:
            lines.append(f"      IRQ {c[0x3C]}, pin {chr(ord('A') + c[0x3D] - 1)}")
        for bar in f["bars"]:
            end = bar["addr"] + bar["size"] - 1
            kind = "I/O at" if bar["io"] else "32 bit memory at"
            lines.append(f"      BAR{bar['index']}: {kind} 0x{bar['addr']:x} [0x{end:x}].")
        lines.append(f'      id "{f["id"]}"')
    return "\n".join(lines)


def info_backends_text(rows: list[dict]) -> str:
    out = [f"{'name':<10} {'kind':<8} {'pid':>7} {'state':<10} {'restarts':>8} {'served':>10} {'all-ones':>8}"]
    for r in rows:
        pid = "-" if r["pid"] is None else str(r["pid"])
        out.append(f"{r['name']:<10} {r['kind']:<8} {pid:>7} {r['state']:<10} {r['restarts']:>8} "
                   f"{r['served']:>10} {r['timeouts']:>8}")
    return "\n".join(out)


IDE_POSITIONS = ("primary master", "primary slave", "secondary master", "secondary slave")
# QEMU's words for each -drive cache= mode (HMP info block, "Cache mode:").
CACHE_WORDS = {"writeback": "writeback", "none": "writeback, direct", "writethrough": "writethrough",
               "directsync": "writethrough, direct", "unsafe": "writeback, ignore flushes"}


def block_devices(sup: Supervisor) -> list[dict]:
    """Every drive, in QEMU's order: IDE by position, then virtio-blk in PCI order."""
    out: list[dict] = []
    virtio = 0
    # The guest names virtio disks in PCI order (vda first), whatever order they were given in.
    for b in sorted(sup.backends.values(), key=lambda b: (b.spec.kind != "ide", b.spec.pci_bdf or 0)):
        opts = b.spec.options
        if b.spec.kind == "ide":
            for i, d in enumerate(opts["drives"]):
                if d is not None:
                    out.append({**_block(d), "attached": f"{b.spec.name} ({IDE_POSITIONS[i]})",
                                "guest": linux_disk_name("hd", i)})
        elif b.spec.kind == "virtio-blk":
            out.append({**_block(opts["drive"]), "attached": b.spec.name, "guest": linux_disk_name("vd", virtio)})
            virtio += 1
    return out


def linux_disk_name(prefix: str, n: int) -> str:
    """Linux's disk names: vda..vdz, then vdaa, vdab... (what the guest firmware calls them too)."""
    letters = ""
    n += 1
    while n:
        n, r = divmod(n - 1, 26)
        letters = chr(ord("a") + r) + letters
    return prefix + letters


def _block(d: dict) -> dict:
    return {"device": d["id"], "file": d["path"], "format": "raw", "ro": d["readonly"], "media": d["media"],
            "cache": d["cache"]}


def info_block_text(drives: list[dict]) -> str:
    if not drives:
        return "no drives"
    out = []
    for d in drives:
        out.append(f"{d['device']}: {d['file']} ({d['format']}{', read-only' if d['ro'] else ''})")
        out.append(f"    Attached to:      {d['attached']}, the guest's {d['guest']}")
        out.append(f"    Cache mode:       {CACHE_WORDS[d['cache']]}")
        out.append("")
    return "\n".join(out).rstrip("\n")


def info_exits_text(stats: dict) -> str:
    if not stats:
        return "vcpu not answering"
    out = [f"{'device':<10} {'accesses':>10} {'median_us':>10} {'p99_us':>10}"]
    for name, s in stats.get("devices", {}).items():
        med = "-" if s["median_us"] is None else f"{s['median_us']:.1f}"
        p99 = "-" if s["p99_us"] is None else f"{s['p99_us']:.1f}"
        out.append(f"{name:<10} {s['accesses']:>10} {med:>10} {p99:>10}")
    u = stats.get("unowned", {})
    out.append(f"unowned: pio reads {u.get('pio_read', 0)}, pio writes {u.get('pio_write', 0)}, "
               f"mmio reads {u.get('mmio_read', 0)}, mmio writes {u.get('mmio_write', 0)}")
    plat = stats.get("platform", {})
    out.append("platform ports: " + ", ".join(f"{name} {n}" for name, n in plat.items()))
    out.append(f"vcpu exits: {stats.get('vcpu_exits', 0)}")
    return "\n".join(out)


def execute(sup: Supervisor, command: str) -> tuple[str, object]:
    """Run one command; return (text for humans, data for JSON). Raises KeyError on a bad command."""
    words = command.split()
    if not words:
        return "", None
    if words[0] == "help" or words[0] == "?":
        return HELP, HELP.splitlines()
    if words[0] == "info" and len(words) == 2:
        what = words[1]
        if what == "backends":
            rows = sup.backends_info()
            return info_backends_text(rows), rows
        if what == "pci":
            funcs = _pci_functions(sup)
            data = [{k: (v.hex() if isinstance(v, bytes) else v) for k, v in f.items()} for f in funcs]
            return info_pci_text(funcs), data
        if what == "exits":
            stats = sup.vcpu_stats()
            return info_exits_text(stats), stats
        if what == "block":
            drives = block_devices(sup)
            return info_block_text(drives), drives
    if words[0] == "backend" and len(words) == 3:
        msg = sup.backend_action(words[1], words[2])
        return msg, msg
    if words[0] in ("quit", "q"):
        raise MonitorQuit
    raise KeyError(f"unknown command: {command!r} (try 'help')")


def handle_line(sup: Supervisor, line: str) -> tuple[str, bool]:
    """One monitor input line (text or JSON) -> (reply text, quit?)."""
    line = line.strip()
    as_json = line.startswith("{")
    try:
        if as_json:
            req = json.loads(line)
            command = req.get("execute") if isinstance(req, dict) else None
            if not isinstance(command, str):
                raise KeyError('JSON commands look like {"execute": "info backends"}')
        else:
            command = line
        text, data = execute(sup, command)
        return (json.dumps({"return": data}) if as_json else text), False
    except MonitorQuit:
        return (json.dumps({"return": "quit"}) if as_json else ""), True
    except (KeyError, ValueError) as e:
        msg = e.args[0] if e.args else str(e)
        return (json.dumps({"error": msg}) if as_json else f"error: {msg}"), False
