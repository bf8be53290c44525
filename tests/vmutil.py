"""Start splitvm as a user would (a real process group) and talk to its console."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def splitvm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "broker.cli", *args]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT)
    return e


def processes_mentioning(text: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmd:
                out.append(int(p.name))
    return out


def wait_gone(text: str, timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = processes_mentioning(text)
        if not left:
            return []
        time.sleep(0.05)
    return processes_mentioning(text)


class VM:
    """splitvm with piped stdin/stdout; output collected by a thread."""

    def __init__(self, *args: str, run_dir: Path | None = None) -> None:
        self.run_dir = run_dir
        argv = list(args) + (["-run-dir", str(run_dir)] if run_dir else [])
        self.proc = subprocess.Popen(
            splitvm_cmd(*argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=ROOT, env=env(), start_new_session=True,
        )
        self.out = bytearray()
        self.err = bytearray()
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _pump(self, f, buf: bytearray) -> None:
        while True:
            chunk = os.read(f.fileno(), 65536)
            if not chunk:
                return
            with self.lock:
                buf += chunk

    @property
    def text(self) -> str:
        with self.lock:
            return self.out.decode(errors="replace")

    def wait_for(self, needle: str, timeout: float = 60.0, start: int = 0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            i = self.text.find(needle, start)
            if i >= 0:
                return i
            if self.proc.poll() is not None:
                time.sleep(0.2)
                i = self.text.find(needle, start)
                if i >= 0:
                    return i
                raise AssertionError(f"splitvm ended ({self.proc.returncode}) before {needle!r}:\n{self.text}\n"
                                     f"stderr: {self.err.decode(errors='replace')}")
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {needle!r}:\n{self.text[-3000:]}")

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def command(self, line: str, timeout: float = 60.0) -> str:
        """Type a command at the prompt; return what it printed before the next prompt."""
        start = len(self.out)
        self.send(line)
        echo = self.wait_for(f"splitvm> {line}", timeout, max(0, start - 20))
        end = self.wait_for("splitvm> ", timeout, echo + 1)
        body = self.text[echo + len("splitvm> ") + len(line) : end]
        return body.replace("\r\n", "\n").strip("\n")

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            for t in self.threads:
                t.join(2)

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End splitvm (SIGTERM, then SIGKILL) and check it left no process or run directory."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass
        if self.run_dir is not None:
            assert not wait_gone(str(self.run_dir)), "backend or vcpu processes outlived splitvm"
            assert not self.run_dir.exists(), "run directory left behind"


def backend_row(run_dir: Path, name: str = "serial0") -> dict:
    """One backend's row of `info backends`, through the monitor's JSON form."""
    import json

    rows = json.loads(ask(run_dir, '{"execute": "info backends"}'))["return"]
    return next(r for r in rows if r["name"] == name)


def ask(run_dir: Path, command: str) -> str:
    """The monitor without starting a process (the `splitvm monitor` CLI takes ~0.5 s to
    start): for tests whose timing matters, such as killing a backend mid-transfer."""
    from broker.monitor_client import ask as monitor_ask

    return monitor_ask(run_dir / "monitor", command)


def monitor(run_dir: Path, command: str) -> str:
    r = subprocess.run(splitvm_cmd("monitor", str(run_dir), command), capture_output=True, text=True, cwd=ROOT,
                       env=env(), timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout
