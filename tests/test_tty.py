"""The console on a real terminal (a pty): raw mode, typed keys, Ctrl-A escapes, restored on exit."""

import os
import pty
import select
import subprocess
import termios
import time

from vmutil import ROOT, env, splitvm_cmd


def read_until(fd: int, needle: bytes, timeout: float = 60.0) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while needle not in out and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                out += os.read(fd, 4096)
            except OSError:
                break
    assert needle in out, out
    return out


def test_terminal_console_monitor_and_restore(run_dir):
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen(splitvm_cmd("-monitor", "stdio", "-run-dir", str(run_dir)), stdin=slave, stdout=slave,
                            stderr=slave, cwd=ROOT, env=env(), start_new_session=True)
    try:
        read_until(master, b"splitvm> ")
        os.write(master, b"echo typed at a tty\r")  # a terminal sends CR for Enter
        read_until(master, b"typed at a tty\r\n")
        assert not termios.tcgetattr(slave)[3] & termios.ECHO  # raw: the guest echoes, not the tty
        os.write(master, b"\x01c")  # Ctrl-A c: to the monitor
        read_until(master, b"(monitor)")
        os.write(master, b"info backends\r")
        read_until(master, b"serial0")
        os.write(master, b"\x01c")
        read_until(master, b"(console)")
        os.write(master, b"\x01x")  # Ctrl-A x: quit
        assert proc.wait(30) == 0
        assert termios.tcgetattr(slave) == before  # the terminal is as it was
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)
    assert not run_dir.exists()
