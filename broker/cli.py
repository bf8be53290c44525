"""`splitvm`: run a VM (the broker is this process), or `splitvm monitor|bench ...`."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import termios
import tty
from pathlib import Path

import zmq

from backends.devices import DeviceSpec, ide_spec, serial_spec, testdev_spec, virtio_blk_spec
from broker.drives import assign_ide_indexes, open_drives
from broker.monitor import handle_line
from broker.notify import monitor_endpoint
from broker.options import Machine, UsageError, parse_args
from broker.supervisor import Supervisor, make_run_dir

CTRL_A = 0x01
USAGE = """\
usage: splitvm [options]                 boot the firmware (or -kernel ELF) with a serial console
       splitvm monitor RUN_DIR|PID [CMD]  talk to a running VM's monitor
       splitvm bench exit                 measure the I/O path
options: -accel kvm|tcg|qtest  -m SIZE  -smp N  -kernel ELF  -append "CMD;CMD"
         -nographic  -serial stdio|none|file:PATH[,logfile=PATH]  -monitor stdio|none
         -trace io[=FILE]  -run-dir DIR  --config FILE.toml
console: Ctrl-A x quits, Ctrl-A c switches between console and monitor (with -monitor stdio)"""


def fail(msg: str, code: int = 1) -> int:
    print(f"splitvm: {msg}", file=sys.stderr)
    return code


def resolve_accel(m: Machine) -> str:
    from vcpu.kvm import kvm_unavailable_reason

    if m.accel in ("tcg", "qtest"):
        return m.accel
    reason = kvm_unavailable_reason()
    if reason is None:
        return "kvm"
    if m.accel == "kvm":
        raise RuntimeError(f"-accel kvm: {reason}")
    print(f"splitvm: KVM unavailable: {reason}; using -accel tcg", file=sys.stderr)
    return "tcg"


def resolve_kernel(m: Machine) -> Path | None:
    if m.kernel is not None or m.accel == "qtest":
        return m.kernel
    from vcpu.guest.build import build

    return build()


class Console:
    """The serial console on the user's terminal (raw mode on a TTY), and the monitor mux."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        self.out_fd = 1 if m.serial == "stdio" else None
        self.file = open(m.serial[5:], "ab") if m.serial.startswith("file:") else None  # noqa: SIM115
        self.log = open(m.serial_log, "ab") if m.serial_log else None  # noqa: SIM115
        self.in_fd: int | None = 0 if (m.serial == "stdio" or m.monitor == "stdio") else None
        self.tty_saved = None
        self.to_monitor = m.monitor == "stdio" and m.serial != "stdio"
        self.escape = False
        self.pending = b""
        self.line = b""
        if self.in_fd is not None and os.isatty(self.in_fd) and m.serial == "stdio":
            self.tty_saved = termios.tcgetattr(self.in_fd)
            tty.setraw(self.in_fd)

    def restore(self) -> None:
        if self.tty_saved is not None:
            termios.tcsetattr(self.in_fd, termios.TCSADRAIN, self.tty_saved)
            self.tty_saved = None

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self.out_fd is not None:
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(self.out_fd, view):]
                except BlockingIOError:
                    continue
                except BrokenPipeError:
                    self.out_fd = None
                    break
        for f in (self.file, self.log):
            if f is not None:
                f.write(data)
                f.flush()

    def monitor_write(self, text: str) -> None:
        """Monitor replies go to the terminal whatever the serial port is wired to."""
        data = text.replace("\n", "\r\n" if self.tty_saved else "\n").encode()
        with contextlib.suppress(BrokenPipeError):
            os.write(1, data)

    def close(self) -> None:
        self.restore()
        for f in (self.file, self.log):
            if f is not None:
                f.close()


def machine_devices(m: Machine) -> list[DeviceSpec]:
    """serial0 always; the IDE controller if there are IDE drives; a virtio-blk function
    per virtio drive; then each -device. PCI slots from 1 upward unless addr= says."""
    specs = [serial_spec(0)]
    taken = {o["addr"] for _d, o in m.devices if "addr" in o} | {d.pci_slot for d in m.drives if d.pci_slot}
    free = (s for s in range(1, 32) if s not in taken)
    ide = assign_ide_indexes(m.drives)  # parse_args placed and named them: this only lists them
    if any(ide):
        specs.append(ide_spec(next(free), [None if d is None else d.as_backend_option() for d in ide]))
    for i, d in enumerate(d for d in m.drives if d.interface == "virtio"):
        spec = virtio_blk_spec(i, d.pci_slot or next(free), d.as_backend_option())
        spec.name = d.device_id or spec.name
        specs.append(spec)
    counts: dict[str, int] = {}
    for driver, opts in m.devices:
        index = counts.get(driver, 0)
        counts[driver] = index + 1
        slot = opts.get("addr") or next(free)
        spec = testdev_spec(index, slot)
        if "id" in opts:
            spec.name = opts["id"]
        specs.append(spec)
    return specs


def run_vm(m: Machine) -> int:
    try:
        accel = resolve_accel(m)
        if accel == "tcg":
            try:
                import unicorn  # noqa: F401
            except ImportError:
                return fail("-accel tcg needs the unicorn package: pip install unicorn")
        kernel = resolve_kernel(m)
    except (RuntimeError, OSError) as e:
        return fail(str(e))
    try:
        open_drives(m.drives)
    except UsageError as e:
        return fail(str(e), 2)
    except OSError as e:
        return fail(f"-drive: {e}", 2)
    try:
        return run_opened(m, accel, kernel)
    finally:
        for d in m.drives:
            if d.fd >= 0:
                os.close(d.fd)
                d.fd = -1


def run_opened(m: Machine, accel: str, kernel: Path | None) -> int:
    try:
        run_dir = make_run_dir(m.run_dir)
    except (FileExistsError, OSError) as e:
        return fail(str(e))
    devices = machine_devices(m)
    sup = Supervisor(run_dir, m.ram_size, m.smp, devices)
    console = Console(m)
    sig_r, sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup = signal.set_wakeup_fd(sig_w)
    got_signal: list[int] = []
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, lambda signum, _f: got_signal.append(signum))
    try:
        for b in sup.backends.values():
            sup.start_backend(b)
        sup.start_vcpu({
            "accel": accel, "kernel": str(kernel), "cmdline": m.append,
            "trace": str(m.trace) if m.trace else None, "qtest": m.qtest,
        })
        return event_loop(sup, console, sig_r, got_signal)
    finally:
        signal.set_wakeup_fd(old_wakeup)
        console.close()
        sup.close()
        os.close(sig_r)
        os.close(sig_w)


def event_loop(sup: Supervisor, console: Console, sig_r: int, got_signal: list[int]) -> int:
    monitor = sup.ctx.socket(zmq.REP)
    monitor.setsockopt(zmq.LINGER, 0)
    monitor.bind(monitor_endpoint(sup.run_dir))
    try:
        return _loop(sup, console, sig_r, got_signal, monitor)
    finally:
        monitor.close()


def _loop(sup: Supervisor, console: Console, sig_r: int, got_signal: list[int], monitor: zmq.Socket) -> int:
    serial = "serial0"
    poller = zmq.Poller()
    poller.register(sup.events, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    poller.register(sig_r, zmq.POLLIN)
    poller.register(sup.vcpu_pidfd, zmq.POLLIN)
    stdin_open = console.in_fd is not None
    if stdin_open:
        poller.register(console.in_fd, zmq.POLLIN)
    watched: dict[int, str] = {}
    quit_requested = False
    while True:
        for b in sup.backends.values():
            if b.pidfd >= 0 and b.pidfd not in watched:
                watched[b.pidfd] = b.name
                poller.register(b.pidfd, zmq.POLLIN)
        next_restart = sup.due_restarts()
        timeout = 20.0
        if next_restart is not None:
            timeout = min(timeout, next_restart * 1000)
        if console.pending:
            timeout = min(timeout, 5.0)
        ready = dict(poller.poll(timeout))
        console.write(sup.console_output(serial))
        if console.pending:
            console.pending = console.pending[sup.console_input(serial, console.pending):]
        if sig_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(sig_r, 64)
        if got_signal:
            print(f"splitvm: terminating on signal {got_signal[0]}", file=sys.stderr)
            return 0
        for fd, name in list(watched.items()):
            if fd in ready:
                poller.unregister(fd)
                del watched[fd]
                sup.reap(sup.backends[name])
        if sup.events in ready:
            while sup.events.poll(0):
                sup.events.recv()
        if monitor in ready:
            reply, quit_requested = handle_line(sup, monitor.recv().decode(errors="replace"))
            monitor.send(reply.encode())
        if stdin_open and console.in_fd in ready:
            try:
                data = os.read(console.in_fd, 4096)
            except OSError as e:
                data = b"" if e.errno == errno.EIO else b""
            if not data:
                # End of piped input: stop reading, keep the VM running until the guest ends.
                poller.unregister(console.in_fd)
                stdin_open = False
            else:
                quit_requested = stdin_input(sup, console, data) or quit_requested
        if sup.vcpu_pidfd in ready:
            code = sup.vcpu.wait()
            poller.unregister(sup.vcpu_pidfd)
            os.close(sup.vcpu_pidfd)
            sup.vcpu_pidfd = -1
            console.write(sup.console_output(serial))
            return code if code >= 0 else 128 - code
        if quit_requested:
            return 0


def stdin_input(sup: Supervisor, console: Console, data: bytes) -> bool:
    """Keystrokes: to the guest's UART, or lines to the monitor. Returns True on quit."""
    out = bytearray()
    quit_requested = False
    for byte in data:
        if console.tty_saved is not None and console.escape:
            console.escape = False
            if byte == ord("x"):
                return True
            if byte == ord("c") and console.m.monitor == "stdio":
                console.to_monitor = not console.to_monitor
                console.monitor_write("\n(monitor)\n" if console.to_monitor else "\n(console)\n")
                continue
            if byte != CTRL_A:
                continue
        elif console.tty_saved is not None and byte == CTRL_A:
            console.escape = True
            continue
        if console.to_monitor:
            if byte in (0x0A, 0x0D):
                if console.tty_saved is not None:
                    console.monitor_write("\n")
                reply, q = handle_line(sup, console.line.decode(errors="replace"))
                console.line = b""
                if reply:
                    console.monitor_write(reply + "\n")
                quit_requested = quit_requested or q
            elif byte in (0x7F, 0x08):
                if console.line:
                    console.line = console.line[:-1]
                    if console.tty_saved is not None:
                        console.monitor_write("\b \b")
            else:
                console.line += bytes((byte,))
                if console.tty_saved is not None and 0x20 <= byte < 0x7F:
                    console.monitor_write(chr(byte))  # the terminal is raw: echo what is typed
        elif console.m.serial == "stdio":
            out.append(byte)
    console.pending += bytes(out)
    return quit_requested


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"], ["-help"]):
        print(USAGE)
        return 0
    if argv[:1] == ["monitor"]:
        from broker.monitor_client import main as monitor_main

        return monitor_main(argv[1:])
    if argv[:1] == ["bench"]:
        from broker.bench import main as bench_main

        return bench_main(argv[1:])
    try:
        machine = parse_args(argv)
    except UsageError as e:
        return fail(str(e), 2)
    return run_vm(machine)


if __name__ == "__main__":
    sys.exit(main())
