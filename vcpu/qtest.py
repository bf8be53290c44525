"""The qtest accelerator: no guest; a test script issues accesses over a socket.

The line protocol follows QEMU's qtest (system/qtest.c) where the two overlap:
  outb|outw|outl PORT VAL        -> OK
  inb|inw|inl PORT               -> OK 0xVAL
  readb|readw|readl|readq ADDR   -> OK 0xVAL     (guest RAM, else MMIO routing)
  writeb|writew|writel|writeq ADDR VAL -> OK
  read ADDR SIZE                 -> OK 0xHEXBYTES (guest RAM only)
  write ADDR SIZE 0xHEXBYTES     -> OK
splitvm's own additions: `irq` -> OK 0xMASK of asserted lines; `wait_irq USEC` ->
OK 0xMASK after waiting up to USEC for a line; `exit CODE` ends the VM.
Errors answer `FAIL reason`. As in QEMU, the VMM connects to the socket the test
script listens on (-qtest unix:PATH).
"""

from __future__ import annotations

import socket

from vcpu.accel import AccessRouter, GuestExit
from vcpu.irq import InterruptState
from vcpu.memory import GuestMemory, GuestMemoryError

SIZES = {"b": 1, "w": 2, "l": 4, "q": 8}
CPU = 0  # every access is posted from vCPU 0's slot


def _int(text: str) -> int:
    return int(text, 0)


class QtestMachine:
    def __init__(self, mem: GuestMemory, target: str, irq: InterruptState) -> None:
        if not target.startswith("unix:"):
            raise ValueError(f"-qtest: expected unix:PATH, got {target!r}")
        self.mem = mem
        self.path = target[5:]
        self.irq = irq
        self.exits = 0

    def run(self, entry: int, router: AccessRouter) -> int:
        del entry  # no guest code runs under qtest
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.path)
        f = sock.makefile("rwb", buffering=0)
        try:
            for raw in f:
                line = raw.decode(errors="replace").strip()
                if not line:
                    continue
                try:
                    reply = self.command(line.split(), router)
                except GuestExit:
                    f.write(b"OK\n")
                    raise
                except (ValueError, IndexError, GuestMemoryError) as e:
                    reply = f"FAIL {e}"
                f.write(reply.encode() + b"\n")
        finally:
            sock.close()
        return 0

    def command(self, words: list[str], router: AccessRouter) -> str:
        op = words[0]
        self.exits += 1
        if op in ("outb", "outw", "outl"):
            size = SIZES[op[-1]]
            router.pio(CPU, _int(words[1]), size, True, (_int(words[2]) & ((1 << 8 * size) - 1)).to_bytes(size,
                       "little"), 1)
            return "OK"
        if op in ("inb", "inw", "inl"):
            size = SIZES[op[-1]]
            return f"OK 0x{int.from_bytes(router.pio(CPU, _int(words[1]), size, False, b'', 1), 'little'):x}"
        if op[:-1] in ("read", "write") and op[-1] in SIZES:
            size = SIZES[op[-1]]
            addr = _int(words[1])
            in_ram = addr + size <= self.mem.size
            if op.startswith("read"):
                data = self.mem.read(addr, size) if in_ram else router.mmio(CPU, addr, size, False, b"")
                return f"OK 0x{int.from_bytes(data, 'little'):x}"
            value = (_int(words[2]) & ((1 << 8 * size) - 1)).to_bytes(size, "little")
            if in_ram:
                self.mem.write(addr, value)
            else:
                router.mmio(CPU, addr, size, True, value)
            return "OK"
        if op == "read":
            return "OK 0x" + self.mem.read(_int(words[1]), _int(words[2])).hex()
        if op == "write":
            addr, size, blob = _int(words[1]), _int(words[2]), words[3]
            data = bytes.fromhex(blob[2:] if blob.startswith("0x") else blob)
            if len(data) != size:
                raise ValueError(f"write: {len(data)} bytes given, SIZE says {size}")
            self.mem.write(addr, data)
            return "OK"
        if op == "irq":
            return f"OK 0x{self.irq.pending():x}"
        if op == "wait_irq":
            return f"OK 0x{self.irq.wait(min(_int(words[1]), 10_000_000) / 1e6):x}"
        if op == "exit":
            raise GuestExit(_int(words[1]) if len(words) > 1 else 0)
        raise ValueError(f"unknown command {op!r}")


class QtestClient:
    """The test-script side: listen, let splitvm connect, then issue commands."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.conn: socket.socket | None = None
        self.f = None

    def accept(self, timeout: float = 30.0) -> None:
        self.server.settimeout(timeout)
        self.conn, _ = self.server.accept()
        self.conn.settimeout(timeout)
        self.f = self.conn.makefile("rwb", buffering=0)

    def cmd(self, line: str) -> str:
        self.f.write(line.encode() + b"\n")
        reply = self.f.readline().decode().strip()
        if not reply.startswith("OK"):
            raise RuntimeError(f"qtest: {line!r}: {reply}")
        return reply[3:]

    def inb(self, port: int) -> int:
        return int(self.cmd(f"inb 0x{port:x}"), 16)

    def inl(self, port: int) -> int:
        return int(self.cmd(f"inl 0x{port:x}"), 16)

    def outb(self, port: int, value: int) -> None:
        self.cmd(f"outb 0x{port:x} 0x{value:x}")

    def outl(self, port: int, value: int) -> None:
        self.cmd(f"outl 0x{port:x} 0x{value:x}")

    def read(self, addr: int, size: int) -> bytes:
        return bytes.fromhex(self.cmd(f"read 0x{addr:x} {size}")[2:])

    def write(self, addr: int, data: bytes) -> None:
        self.cmd(f"write 0x{addr:x} {len(data)} 0x{data.hex()}")

    def close(self) -> None:
        for s in (self.f, self.conn, self.server):
            if s is not None:
                s.close()
