"""QEMU running the firmware with its serial console on stdin/stdout, for tests that
check our drivers against QEMU's own device models."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from contextlib import suppress
from pathlib import Path

QEMU = shutil.which("qemu-system-x86_64")
PROMPT = "splitvm> "
COMMAND_TIMEOUT = 60.0


def qemu_cmd(firmware: Path, *extra: str) -> list[str]:
    """TCG, no NIC unless asked, isa-debug-exit for `exit N` (status (N << 1) | 1)."""
    assert QEMU is not None
    return [QEMU, "-kernel", str(firmware), "-nographic", "-accel", "tcg", "-m", "128", "-no-reboot",
            "-nic", "none", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", *extra]


class QemuConsole:
    """A QEMU process whose serial console is stdin/stdout."""

    def __init__(self, cmd: list[str]) -> None:
        self._buf = bytearray()
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(4096):
            with self._cond:
                self._buf += chunk
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def text(self) -> str:
        """Everything printed so far, with CRs dropped."""
        with self._cond:
            return self._buf.decode(errors="replace").replace("\r", "")

    def wait_for_prompts(self, count: int, timeout: float) -> str:
        """Wait until the prompt has been printed `count` times."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                text = self._buf.decode(errors="replace").replace("\r", "")
                if text.count(PROMPT) >= count:
                    return text
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None):
                    raise AssertionError(f"timed out waiting for prompt #{count}; output so far:\n{text}")
                self._cond.wait(min(remaining, 0.5))

    def send_line(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def command(self, line: str, timeout: float = COMMAND_TIMEOUT) -> list[str]:
        """Type `line` at the prompt and return the lines it printed."""
        before = self.wait_for_prompts(self.text.count(PROMPT), timeout)
        n = before.count(PROMPT)
        self.send_line(line)
        after = self.wait_for_prompts(n + 1, timeout)
        # Output of this command: from the echoed input up to the next prompt.
        start = after.index(PROMPT + line + "\n", len(before) - len(PROMPT))
        body = after[start + len(PROMPT) + len(line) + 1 :]
        return body[: body.index(PROMPT)].splitlines()

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"QEMU did not exit; output:\n{self.text}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdin is not None:
            with suppress(BrokenPipeError):
                self.proc.stdin.close()
        self._reader.join(5)
