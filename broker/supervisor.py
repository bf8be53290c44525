"""The supervisor: starts the process group, restarts backends, ends everything.

It holds every memfd (guest RAM, sharing pages, state regions), so no child's death
frees them. Deaths are seen at once through pidfds in the event loop. A backend that
dies is started again after a backoff; one that dies RESTART_LIMIT times within
RESTART_WINDOW_S is marked failed: its sharing page says so, and the vcpu completes
its accesses with all-ones instead of the VM hanging.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import zmq

from backends.devices import DeviceSpec
from broker.children import pidfd, spawn
from broker.layout import (
    IO_PAGE_SIZE,
    STATE_REGION_SIZE,
    Mapped,
    create_region_fd,
    init_io_page,
    map_io_page,
    map_state_region,
)
from broker.notify import broker_endpoint, door_endpoint, pull_socket, push_socket, ring, vcpu_control_endpoint
from broker.state import StateReader
from vcpu.memory import create_ram_fd

RESTART_LIMIT = 5
RESTART_WINDOW_S = 10.0
BACKOFF_BASE_S = 0.05
BACKOFF_MAX_S = 2.0
STOP_GRACE_S = 1.0

RUNNING, STOPPED, RESTARTING, FAILED = "running", "stopped", "restarting", "failed"


@dataclass
class BackendProcess:
    spec: DeviceSpec
    page_fd: int
    state_fd: int
    page: Mapped
    region: Mapped
    proc: subprocess.Popen | None = None
    pidfd: int = -1
    state: str = RESTARTING
    restarts: int = 0
    deaths: deque = field(default_factory=lambda: deque(maxlen=RESTART_LIMIT))
    restart_at: float = 0.0

    @property
    def name(self) -> str:
        return self.spec.name


def drive_fds(spec: DeviceSpec) -> list[int]:
    """The image descriptors a backend inherits (opened and locked by the broker)."""
    drives = list(spec.options.get("drives", [])) + [spec.options.get("drive")]
    return [d["fd"] for d in drives if d is not None]


def make_run_dir(requested: Path | None) -> Path:
    if requested is None:
        base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
        return Path(tempfile.mkdtemp(prefix="splitvm-", dir=base))
    requested.mkdir(mode=0o700, parents=True, exist_ok=True)
    if any(requested.iterdir()):
        raise FileExistsError(f"-run-dir: {requested} is not empty")
    os.chmod(requested, 0o700)
    return requested


class Supervisor:
    """Parent of the vcpu and every backend; the control plane's hub."""

    def __init__(self, run_dir: Path, ram_size: int, ncpus: int, devices: list[DeviceSpec]) -> None:
        self.run_dir = run_dir
        self.ram_size = ram_size
        self.ncpus = ncpus
        self.ram_fd = create_ram_fd(ram_size)
        self.backends: dict[str, BackendProcess] = {}
        for spec in devices:
            page_fd = create_region_fd(f"splitvm-{spec.name}-io", IO_PAGE_SIZE)
            init_io_page(page_fd, ncpus)
            state_fd = create_region_fd(f"splitvm-{spec.name}-state", STATE_REGION_SIZE)
            self.backends[spec.name] = BackendProcess(
                spec, page_fd, state_fd, map_io_page(page_fd), map_state_region(state_fd)
            )
        self.vcpu: subprocess.Popen | None = None
        self.vcpu_pidfd = -1
        self.ctx = zmq.Context()
        self.events = pull_socket(self.ctx, broker_endpoint(run_dir))
        self.doors = {n: push_socket(self.ctx, door_endpoint(run_dir, n)) for n in self.backends}
        (run_dir / "pid").write_text(str(os.getpid()))

    # -- starting ----------------------------------------------------------------------
    def start_backend(self, b: BackendProcess) -> None:
        fds = [b.page_fd, b.state_fd] + drive_fds(b.spec)
        args = [
            "--spec", json.dumps(b.spec.to_dict()), "--page-fd", str(b.page_fd), "--state-fd", str(b.state_fd),
            "--run-dir", str(self.run_dir), "--ncpus", str(self.ncpus),
        ]
        if b.spec.needs_ram:
            fds.append(self.ram_fd)
            args += ["--ram-fd", str(self.ram_fd), "--ram-size", str(self.ram_size)]
        for fd in fds:
            os.set_inheritable(fd, True)
        b.proc = spawn("backends.host", args, tuple(fds))
        b.pidfd = pidfd(b.proc.pid)
        b.state = RUNNING
        b.page.ptr.failed = 0

    def start_vcpu(self, vcpu_cfg: dict) -> None:
        fds = [self.ram_fd] + [b.page_fd for b in self.backends.values()]
        for fd in fds:
            os.set_inheritable(fd, True)
        cfg = dict(vcpu_cfg)
        cfg.update(
            ram_fd=self.ram_fd, ram_size=self.ram_size, ncpus=self.ncpus, run_dir=str(self.run_dir),
            backends=[
                {"name": b.name, "page_fd": b.page_fd, "ports": b.spec.ports, "pci_bdf": b.spec.pci_bdf,
                 "coalesced_ports": b.spec.options.get("coalesced_ports", [])}
                for b in self.backends.values()
            ],
        )
        self.vcpu = spawn("vcpu.main", [json.dumps(cfg)], tuple(fds))
        self.vcpu_pidfd = pidfd(self.vcpu.pid)

    # -- deaths and restarts -----------------------------------------------------------
    def reap(self, b: BackendProcess) -> None:
        """Called when b's pidfd is readable: it died."""
        if b.proc is not None:
            b.proc.wait()
        os.close(b.pidfd)
        b.pidfd = -1
        b.proc = None
        if b.state == FAILED:
            return
        now = time.monotonic()
        b.deaths.append(now)
        recent = [t for t in b.deaths if now - t < RESTART_WINDOW_S]
        if len(recent) >= RESTART_LIMIT:
            b.state = FAILED
            b.page.ptr.failed = 1  # the vcpu completes its posted slots with all-ones
            return
        b.state = RESTARTING
        b.restart_at = now + min(BACKOFF_MAX_S, BACKOFF_BASE_S * (2 ** (len(recent) - 1)) if len(recent) > 1 else 0)

    def due_restarts(self) -> float | None:
        """Restart what is due; return seconds until the next one, if any."""
        now = time.monotonic()
        nxt = None
        for b in self.backends.values():
            if b.state == RESTARTING and b.proc is None:
                if b.restart_at <= now:
                    b.restarts += 1
                    self.start_backend(b)
                else:
                    wait = b.restart_at - now
                    nxt = wait if nxt is None else min(nxt, wait)
        return nxt

    # -- monitor actions -----------------------------------------------------------------
    def backend_action(self, action: str, name: str) -> str:
        b = self.backends.get(name)
        if b is None:
            raise KeyError(f"no backend named {name!r} (see 'info backends')")
        if action == "kill":
            if b.proc is None:
                return f"{name} is not running"
            b.proc.send_signal(signal.SIGKILL)
            return f"{name}: killed (pid {b.proc.pid})"
        if action == "stop":
            if b.proc is None:
                return f"{name} is not running"
            b.proc.send_signal(signal.SIGSTOP)
            b.state = STOPPED
            return f"{name}: stopped"
        if action == "cont":
            if b.proc is None or b.state != STOPPED:
                return f"{name} is not stopped"
            b.proc.send_signal(signal.SIGCONT)
            b.state = RUNNING
            return f"{name}: continued"
        if action == "restart":
            b.deaths.clear()
            if b.proc is not None:
                if b.state == STOPPED:
                    b.proc.send_signal(signal.SIGCONT)
                b.state = RESTARTING
                b.restart_at = 0
                b.proc.send_signal(signal.SIGKILL)
            else:
                b.state = RESTARTING
                b.restart_at = 0
            return f"{name}: restarting"
        raise KeyError(f"unknown backend action {action!r} (kill, stop, cont, restart)")

    def backends_info(self) -> list[dict]:
        out = []
        for b in self.backends.values():
            p = b.page.ptr
            out.append({
                "name": b.name, "kind": b.spec.kind, "pid": b.proc.pid if b.proc else None, "state": b.state,
                "restarts": b.restarts, "served": int(p.served), "timeouts": int(p.timeouts),
            })
        return out

    def vcpu_stats(self, timeout_ms: int = 1000) -> dict:
        sock = self.ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(vcpu_control_endpoint(self.run_dir))
        try:
            sock.send(msgpack.packb("stats"))
            if not sock.poll(timeout_ms):
                return {}
            return msgpack.unpackb(sock.recv(), strict_map_key=False)
        finally:
            sock.close()

    # -- console --------------------------------------------------------------------------
    def console_output(self, name: str) -> bytes:
        b = self.backends[name]
        b.region.ptr.out_notify = 0
        data = StateReader(b.region).drain_output()
        b.region.ptr.out_notify = 1
        return data

    def console_input(self, name: str, data: bytes) -> int:
        n = StateReader(self.backends[name].region).feed_input(data)
        if n:
            ring(self.doors[name], b"in")
        return n

    # -- ending ---------------------------------------------------------------------------
    def stop_all(self) -> None:
        procs = [b.proc for b in self.backends.values() if b.proc is not None]
        if self.vcpu is not None and self.vcpu.poll() is None:
            procs.append(self.vcpu)
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGCONT)
                p.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for p in procs:
            try:
                p.wait(max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for b in self.backends.values():
            b.proc = None
            if b.pidfd >= 0:
                os.close(b.pidfd)
                b.pidfd = -1

    def close(self) -> None:
        self.stop_all()
        self.events.close()
        for s in self.doors.values():
            s.close()
        self.ctx.term()
        for b in self.backends.values():
            b.page.close()
            b.region.close()
            os.close(b.page_fd)
            os.close(b.state_fd)
        os.close(self.ram_fd)
        shutil.rmtree(self.run_dir, ignore_errors=True)
