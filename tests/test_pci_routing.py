"""PCI BAR routing through a backend process: assignment, MMIO, I/O BARs, remap, INTx."""

import time

import pytest
from conftest import accels
from vmutil import VM, backend_row, monitor


@pytest.mark.parametrize("accel", accels())
def test_bars_route_to_the_backend_and_follow_a_move(accel, run_dir):
    with VM("-accel", accel, "-device", "testdev", "-device", "testdev,id=td9,addr=5", run_dir=run_dir) as vm:
        vm.wait_for("splitvm> ")
        assert vm.command("lspci").splitlines() == [
            "00:00.0 0600: 8086:1237 Host bridge",
            "00:01.0 00ff: 5056:0001 Unclassified device",
            "  BAR0: 32-bit memory at 0xe0000000 [size 0x1000]",
            "  BAR1: I/O at 0xc000 [size 0x20]",
            "00:05.0 00ff: 5056:0001 Unclassified device",
            "  BAR0: 32-bit memory at 0xe0001000 [size 0x1000]",
            "  BAR1: I/O at 0xc020 [size 0x20]",
        ]
        assert vm.command("peek 0xe0000000") == "0x44545653"  # ID register, over MMIO
        vm.command("poke 0xe0000004 0x1234abcd")
        assert vm.command("in 0xc004 l") == "0x1234abcd"  # the same register through the I/O BAR
        assert vm.command("peek 0xe0001004") == "0x00000000"  # the other device has its own
        vm.command("poke 0xe0000100 0xfeedf00d")
        assert vm.command("peek 0xe0000100") == "0xfeedf00d"
        # The guest moves BAR0: the old window goes dark, the new one reaches the device.
        vm.command("pcicfg 01.0 0x10 0xe0100000")
        assert vm.command("pcicfg 01.0 0x10") == "0xe0100000"
        assert vm.command("peek 0xe0100004") == "0x1234abcd"
        assert vm.command("peek 0xe0000004") == "0xffffffff"
        pci = monitor(run_dir, "info pci")
        assert "BAR0: 32 bit memory at 0xe0100000 [0xe0100fff]." in pci
        assert 'id "td9"' in pci
        # Memory decode off in the command register: the BAR no longer decodes.
        vm.command("pcicfg 01.0 0x04 0x00000005")
        assert vm.command("peek 0xe0100004") == "0xffffffff"
        assert vm.command("in 0xc004 l") == "0x1234abcd"
        vm.send("exit 0")
        assert vm.wait() == 0


def test_intx_level_and_restart_keep_the_device_state(run_dir):
    with VM("-device", "testdev", run_dir=run_dir) as vm:
        vm.wait_for("splitvm> ")
        assert vm.command("pcicfg 01.0 0x3c") == "0x0000010b"  # pin A, line 11
        assert vm.command("in 0x508 l") == "0x00000000"  # no line asserted
        vm.command("poke 0xe0000008 1")
        assert vm.command("in 0x508 l") == "0x00000800"  # IRQ 11 asserted by the backend
        vm.command("poke 0xe0000004 0x600d")
        monitor(run_dir, "backend kill testdev0")
        time.sleep(0.3)
        row = backend_row(run_dir, "testdev0")
        assert row["restarts"] == 1 and row["state"] == "running"
        assert vm.command("peek 0xe0000004") == "0x0000600d"  # registers outlived the process
        assert vm.command("in 0x508 l") == "0x00000800"  # and so did the line level
        vm.command("poke 0xe0000008 0")
        assert vm.command("in 0x508 l") == "0x00000000"
        vm.send("exit 0")
        assert vm.wait() == 0


def test_device_option_errors(tmp_path):
    import subprocess

    from vmutil import ROOT, env, splitvm_cmd

    for args, needle in [
        (["-device", "sb16"], "-device: unknown device 'sb16' (known: ide-cd, ide-hd, testdev, virtio-blk-pci)"),
        (["-device", "testdev,addr=40"], "-device: testdev: addr=40 is not a PCI slot 1..1f"),
        (["-device", "testdev,color=red"], "-device: testdev: unknown property 'color=red'"),
        (["-device", "testdev,addr=3", "-device", "testdev,addr=3"], "two devices at the same PCI slot"),
        (["-device", "testdev,id=a/b"], "id='a/b' must be"),
    ]:
        r = subprocess.run(splitvm_cmd(*args), capture_output=True, text=True, cwd=ROOT, env=env(), timeout=30)
        assert r.returncode == 2, args
        assert needle in r.stderr, r.stderr
