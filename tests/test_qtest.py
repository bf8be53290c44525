"""The qtest accelerator: a script drives the real serial backend process with no guest."""

import subprocess

from vmutil import ROOT, env, splitvm_cmd

from vcpu.qtest import QtestClient


def start(tmp_path, run_dir):
    sock = str(tmp_path / "qtest.sock")
    client = QtestClient(sock)
    proc = subprocess.Popen(splitvm_cmd("-accel", "qtest", "-qtest", f"unix:{sock}", "-run-dir", str(run_dir)),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            env=env())
    client.accept()
    return client, proc


def test_qtest_drives_the_uart_pci_and_ram(tmp_path, run_dir):
    client, proc = start(tmp_path, run_dir)
    try:
        client.outb(0x3FF, 0x5A)  # scratch register, served by the serial0 process
        assert client.inb(0x3FF) == 0x5A
        client.outb(0x3FB, 0x03)  # LCR 8N1
        for ch in b"qtest!\n":
            assert client.inb(0x3FD) & 0x20  # THRE
            client.outb(0x3F8, ch)
        client.outl(0xCF8, 0x80000000)  # 00:00.0 vendor/device, answered by the vcpu's host bridge
        assert client.inl(0xCFC) == 0x12378086
        client.outl(0xCF8, 0x80000800)  # 00:01.0: nothing there
        assert client.inl(0xCFC) == 0xFFFFFFFF
        assert client.inb(0x80) == 0xFF  # unowned port
        client.write(0x1000, b"\x01\x02\x03\x04")
        assert client.read(0x1000, 4) == b"\x01\x02\x03\x04"
        assert client.cmd("readl 0x1000") == "0x4030201"
        assert client.cmd("readl 0xe0000000") == "0xffffffff"  # no BAR there
        assert client.cmd("irq") == "0x0"
        client.outb(0x3FC, 0x08)  # MCR.OUT2 lets the UART's line through
        client.outb(0x3F9, 0x02)  # IER.ETBEI: THR empty raises IRQ 4
        assert int(client.cmd("wait_irq 1000000"), 16) & (1 << 4)
        try:
            client.cmd("frobnicate 1")
        except RuntimeError as e:
            assert "unknown command" in str(e)
        else:
            raise AssertionError("a bad command must FAIL")
        client.cmd("exit 3")
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 3, err
        assert out.decode() == "qtest!\n"
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert not run_dir.exists()


def test_qtest_needs_a_unix_socket(tmp_path):
    r = subprocess.run(splitvm_cmd("-accel", "qtest"), capture_output=True, text=True, cwd=ROOT, env=env())
    assert r.returncode == 2 and "-accel qtest: needs -qtest unix:PATH" in r.stderr
    r = subprocess.run(splitvm_cmd("-accel", "qtest", "-qtest", "tcp:1"), capture_output=True, text=True, cwd=ROOT,
                       env=env())
    assert r.returncode == 2 and "-qtest: expected unix:PATH" in r.stderr
