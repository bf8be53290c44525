"""Disks on splitvm: IDE (PIO, DMA, ATAPI) and virtio-blk backends driven by the firmware,
checked against host sha256, mkfs.fat, and the same commands on QEMU's own devices."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from conftest import accels
from vmutil import VM, ask, backend_row, monitor

MiB = 1 << 20
QEMU = shutil.which("qemu-system-x86_64")
MKFS_FAT = shutil.which("mkfs.fat") or ("/sbin/mkfs.fat" if os.path.exists("/sbin/mkfs.fat") else None)


def sha(path, nbytes=None) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data if nbytes is None else data[:nbytes]).hexdigest()


@pytest.fixture
def disks(tmp_path):
    a, b, c = tmp_path / "a.img", tmp_path / "b.img", tmp_path / "c.iso"
    a.write_bytes(os.urandom(4 * MiB))
    b.write_bytes(bytes(4 * MiB))
    c.write_bytes(os.urandom(512 * 2048))
    return a, b, c


@pytest.mark.parametrize("accel", accels())
def test_copy_between_ide_and_virtio_checked_on_the_host(accel, disks, run_dir):
    a, b, c = disks
    want_a, want_c = sha(a), sha(c)
    with VM("-accel", accel, "-hda", str(a), "-drive", f"file={b},if=virtio,format=raw", "-cdrom", str(c),
            run_dir=run_dir) as vm:
        vm.wait_for("splitvm> ")
        assert vm.command("lsblk").splitlines() == [
            f"hda {4 * MiB} disk ide-dma",
            f"hdc {512 * 2048} cdrom atapi ro",
            f"vda {4 * MiB} disk virtio-blk",
        ]
        assert vm.command("sha256sum hda") == f"{want_a}  hda"
        assert vm.command("sha256sum hdc") == f"{want_c}  hdc"
        assert vm.command("dd if=hda of=vda bs=65536") == "64+0 records in\n64+0 records out"
        assert vm.command("sha256sum vda") == f"{want_a}  vda"
        assert vm.command("ide pio") == ""
        assert vm.command("lsblk").splitlines()[0] == f"hda {4 * MiB} disk ide-pio"
        assert vm.command("sha256sum hda 1000000") == f"{sha(a, 1000000)}  hda"
        # PIO writes: the CD's first 64 KiB onto hda at 1 MiB.
        assert vm.command("dd if=hdc of=hda bs=2048 count=32 seek=512") == "32+0 records in\n32+0 records out"
        assert "Read-only file system" in vm.command("dd if=hda of=hdc count=1")
        vm.send("exit 0")
        assert vm.wait() == 0
    assert sha(b) == want_a  # every byte the guest copied is in the image
    data = a.read_bytes()
    expect = c.read_bytes()[: 64 * 1024]
    assert data[MiB : MiB + 64 * 1024] == expect


def run_commands_qemu(firmware, a, b, c, commands):
    from qemuutil import QemuConsole, qemu_cmd

    con = QemuConsole(qemu_cmd(firmware, "-drive", f"file={a},if=ide,index=0,format=raw",
                               "-drive", f"file={b},if=virtio,format=raw", "-cdrom", str(c)))
    try:
        con.wait_for_prompts(1, 60)
        return [con.command(cmd, 120) for cmd in commands]
    finally:
        con.close()


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
def test_same_answers_on_qemus_devices_and_ours(disks, tmp_path, run_dir):
    """One script on QEMU's PIIX IDE and virtio-blk, then on splitvm's: same printed hashes."""
    from vcpu.guest.build import build

    a, b, c = disks
    commands = ["lsblk", "sha256sum hda", "sha256sum hdc", "sha256sum vda 65536", "dd if=hdc of=vda bs=2048 count=8",
                "sha256sum vda 16384", "dd if=hda of=vda bs=4096 skip=3 seek=5 count=7", "sha256sum vda"]
    copies = []
    for tag in ("qemu", "ours"):
        d = tmp_path / tag
        d.mkdir()
        for p in (a, b, c):
            shutil.copy(p, d / p.name)
        copies.append((d / a.name, d / b.name, d / c.name))
    qemu_out = run_commands_qemu(build(), *copies[0], commands)
    qa, qb, qc = copies[1]
    with VM("-hda", str(qa), "-drive", f"file={qb},if=virtio,format=raw", "-cdrom", str(qc), run_dir=run_dir) as vm:
        vm.wait_for("splitvm> ")
        ours = [vm.command(cmd).splitlines() for cmd in commands]
        vm.send("exit 0")
        vm.wait()
    # lsblk differs only in the IDE driver mode both pick (DMA on both: same line).
    assert ours == qemu_out
    assert sha(copies[0][1]) == sha(copies[1][1])


@pytest.mark.skipif(MKFS_FAT is None, reason="mkfs.fat not installed (apt-get install dosfstools)")
def test_fat_labels_equal_what_mkfs_fat_was_given(tmp_path, run_dir):
    fat16, fat32, fat16b = tmp_path / "fat16.img", tmp_path / "fat32.img", tmp_path / "fat16b.img"
    subprocess.run([MKFS_FAT, "-C", "-n", "SPLITVM16", str(fat16), "16384"], check=True, capture_output=True)
    subprocess.run([MKFS_FAT, "-C", "-F", "32", "-n", "VOL32", str(fat32), str(40 * 1024)], check=True,
                   capture_output=True)
    fat32b = tmp_path / "fat32b.img"
    shutil.copy(fat16, fat16b)
    shutil.copy(fat32, fat32b)
    with VM("-hda", str(fat16), "-hdb", str(fat32), "-drive", f"file={fat16b},if=virtio,format=raw",
            "-drive", f"file={fat32b},if=virtio,readonly=on", run_dir=run_dir) as vm:
        vm.wait_for("splitvm> ")
        assert vm.command("fatlabel hda") == "SPLITVM16"  # IDE DMA
        assert vm.command("fatlabel hdb") == "VOL32"
        assert vm.command("fatlabel vda") == "SPLITVM16"  # virtio-blk
        assert vm.command("fatlabel vdb") == "VOL32"
        vm.command("ide pio")
        assert vm.command("fatlabel hda") == "SPLITVM16"  # IDE PIO
        vm.send("exit 0")
        assert vm.wait() == 0


def test_flushed_writes_survive_sigkill_of_the_whole_group(disks, run_dir):
    a, b, _c = disks
    vm = VM("-hda", str(a), "-drive", f"file={b},if=virtio,format=raw", run_dir=run_dir)
    try:
        vm.wait_for("splitvm> ")
        vm.command("dd if=hda of=vda bs=65536 count=32")  # dd flushes the destination at the end
        os.killpg(vm.proc.pid, signal.SIGKILL)  # no chance to clean up: only FLUSH counts
        vm.proc.wait(10)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        vm.close()
    assert b.read_bytes()[: 2 * MiB] == a.read_bytes()[: 2 * MiB]


def kill_repeatedly(vm, run_dir, name: str, times: int, gap: float, done: str) -> int:
    """Kill `name` while the guest's transfer runs: count the kills that landed before the
    guest printed `done` (a kill after it would prove nothing)."""
    killed = 0
    for _ in range(times):
        time.sleep(gap)
        if "killed" in ask(run_dir, f"backend kill {name}") and done not in vm.text:
            killed += 1
    return killed


@pytest.mark.parametrize("accel", accels())
def test_kill_9_ide0_mid_dma_write_loses_nothing(accel, tmp_path, run_dir):
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(os.urandom(32 * MiB))
    dst.write_bytes(bytes(32 * MiB))
    with VM("-accel", accel, "-hda", str(dst), "-drive", f"file={src},if=virtio,format=raw", run_dir=run_dir) as vm:
        vm.wait_for("splitvm> ")
        vm.send("dd if=vda of=hda bs=65536")
        vm.wait_for("splitvm> dd if=vda of=hda bs=65536")
        assert kill_repeatedly(vm, run_dir, "ide0", 3, 0.3, "records out") >= 1
        out = vm.command("sha256sum hda", timeout=300)
        assert out == f"{sha(src)}  hda"
        text = vm.text
        assert "512+0 records out" in text and "error" not in text.lower() and "timeout" not in text
        rows = {r.split()[0]: r.split() for r in monitor(run_dir, "info backends").splitlines()[1:]}
        assert int(rows["ide0"][4]) >= 1 and rows["ide0"][3] == "running"
        vm.send("exit 0")
        assert vm.wait() == 0
    assert sha(dst) == sha(src)


RAMP = bytes(range(256)) * 4


def pattern(offset: int, length: int) -> bytes:
    """The firmware's `bench disk ... write` pattern (vcpu/guest/blk_bench.c fill_pattern):
    per 512-byte sector, "SPVMBNCH", its byte offset (8 bytes LE), then bytes
    ((offset >> 9) + i) & 0xFF for i in 16..511."""
    out = bytearray()
    for off in range(offset, offset + length, 512):
        start = ((off >> 9) + 16) & 0xFF
        out += b"SPVMBNCH" + off.to_bytes(8, "little") + RAMP[start : start + 496]
    return bytes(out)


def test_kill_9_blk0_with_requests_in_flight_completes_each_once(tmp_path, run_dir):
    img = tmp_path / "v.img"
    size = 128 * MiB  # long enough that every kill lands while requests are in flight
    with open(img, "wb") as f:
        f.truncate(size)
    with VM("-drive", f"file={img},if=virtio,format=raw", run_dir=run_dir) as vm:
        vm.wait_for("splitvm> ")
        cmd = f"bench disk vda write bs=65536 size={size} qd=16"
        vm.send(cmd)
        vm.wait_for(f"splitvm> {cmd}")
        assert kill_repeatedly(vm, run_dir, "blk0", 3, 0.05, "mode=write") >= 1
        vm.wait_for("mode=write", timeout=300)
        text = vm.text
        assert "error" not in text.lower() and "timeout" not in text and "needs reset" not in text
        assert vm.command("sha256sum vda", timeout=300) == f"{hashlib.sha256(pattern(0, size)).hexdigest()}  vda"
        vm.send("exit 0")
        assert vm.wait() == 0
    assert img.read_bytes() == pattern(0, size)


@pytest.mark.parametrize("accel", accels())
def test_string_io_reaches_ide0_as_one_access_per_sector(accel, disks, tmp_path):
    """`rep insw`/`rep outsw` of a sector: one trapped access with count=256, not 256."""
    a, _b, _c = disks
    trace = tmp_path / "io.trace"
    import subprocess as sp

    from vmutil import ROOT, env, splitvm_cmd

    r = sp.run(splitvm_cmd("-accel", accel, "-hda", str(a), "-trace", f"io={trace}", "-append",
                           "ide pio; sha256sum hda 8192; dd if=hda of=hda bs=512 count=4 skip=8 seek=16; exit 0"),
               stdin=sp.DEVNULL, capture_output=True, text=True, cwd=ROOT, env=env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{sha(a, 8192)}  hda" in r.stdout.replace("\r\n", "\n")
    data = [ln for ln in trace.read_text().splitlines() if "dev=ide0" in ln and "addr=0x1f0" in ln]
    reads = [ln for ln in data if " pio r " in ln]
    writes = [ln for ln in data if " pio w " in ln]
    assert len(reads) >= 16 + 4 and all("size=2 count=256" in ln for ln in reads)
    assert len(writes) == 4 and all("size=2 count=256" in ln for ln in writes)
    assert a.read_bytes()[16 * 512 : 20 * 512] == a.read_bytes()[8 * 512 : 12 * 512]


def platform_info_reads(run_dir) -> int:
    return json.loads(ask(run_dir, '{"execute": "info exits"}'))["return"]["platform"]["info"]


@pytest.mark.parametrize("accel", accels())
def test_virtio_blk_requests_ask_the_platform_nothing(accel, disks, run_dir):
    """Paravirtual I/O: a request is memory traffic, and the driver's timeout needs the TSC
    rate only once. 1008 more requests add no access to the platform's info ports (each
    used to make two, ~50 µs of exits). (Whether a request costs an exit at all depends on
    the host's load: the driver sleeps in the VMM if blk0 is slower than its 300 µs spin.)"""
    a, _b, _c = disks
    with VM("-accel", accel, "-drive", f"file={a},if=virtio,format=raw", run_dir=run_dir) as vm:
        vm.wait_for("splitvm> ")
        cost = []
        for count in (16, 1024):
            before = platform_info_reads(run_dir)
            assert vm.command(f"dd if=vda of=vda bs=4096 count={count} seek=0") == \
                f"{count}+0 records in\n{count}+0 records out"
            cost.append(platform_info_reads(run_dir) - before)
        assert cost[0] == cost[1] and cost[0] < 16, cost
        assert "platform ports: signature" in ask(run_dir, "info exits")
        vm.send("exit 0")
        assert vm.wait() == 0


def irqs_raised(run_dir) -> int:
    return json.loads(ask(run_dir, '{"execute": "info exits"}'))["return"]["irq"]["raised"]


def test_virtio_blk_driver_sleeps_until_the_interrupt_when_blk0_stalls(tmp_path, run_dir):
    """The firmware polls the used ring with interrupts off, then (after 300 µs) turns them
    on and sleeps in the VMM: a device that stalls (stopped) and comes back wakes it by
    INTx, and the transfer ends without an error. A `cont` that lands while the driver is
    between sleeps (polling, interrupts off) rightly raises nothing, so stall again."""
    img = tmp_path / "v.img"
    size = 128 * MiB
    with open(img, "wb") as f:
        f.truncate(size)
    with VM("-drive", f"file={img},if=virtio,format=raw", run_dir=run_dir) as vm:
        vm.wait_for("splitvm> ")
        cmd = f"bench disk vda write bs=4096 size={size} qd=1"  # 32768 requests: long enough to stall 20 times
        vm.send(cmd)
        vm.wait_for(f"splitvm> {cmd}")
        woken = 0
        for _ in range(20):
            raised = irqs_raised(run_dir)
            assert "stopped" in ask(run_dir, "backend stop blk0")
            if "mode=write" in vm.text:
                break  # the transfer ended before this stall
            time.sleep(0.05)
            assert "continued" in ask(run_dir, "backend cont blk0")
            time.sleep(0.005)
            woken += irqs_raised(run_dir) > raised
            if woken >= 2:
                break
        else:
            pytest.fail("the transfer outlived 20 stalls")
        if "stopped" in backend_row(run_dir, "blk0")["state"]:
            ask(run_dir, "backend cont blk0")
        assert woken >= 2
        vm.wait_for("mode=write", timeout=300)
        text = vm.text
        assert "error" not in text.lower() and "timeout" not in text and "needs reset" not in text
        vm.send("exit 0")
        assert vm.wait() == 0
    assert img.read_bytes()[size - 512 :] == pattern(size - 512, 512)


@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_cache_none_keeps_the_image_out_of_the_host_page_cache(cache, tmp_path, run_dir):
    """cache=none as QEMU means it: O_DIRECT, so the guest reading its whole disk (through
    virtio-blk and IDE DMA) leaves none of the image in the host's page cache; IDE PIO's
    staged sectors fall back to buffered I/O and still read right."""
    from test_block import cached_pages, evict

    v, h = tmp_path / "v.img", tmp_path / "h.img"
    v.write_bytes(os.urandom(4 * MiB))
    h.write_bytes(os.urandom(4 * MiB))
    want_v, want_h, want_h64k = sha(v), sha(h), sha(h, 65536)  # the host's reads go first
    evict(v)
    evict(h)
    with VM("-drive", f"file={v},if=virtio,format=raw,cache={cache}",
            "-drive", f"file={h},if=ide,format=raw,cache={cache}", run_dir=run_dir) as vm:
        vm.wait_for("splitvm> ")
        assert vm.command("sha256sum vda") == f"{want_v}  vda"
        assert vm.command("sha256sum hda") == f"{want_h}  hda"
        assert vm.command("dd if=vda of=hda bs=65536 count=16 seek=32") == "16+0 records in\n16+0 records out"
        assert (cached_pages(v), cached_pages(h)) == ((0, 0) if cache == "none" else (1024, 1024))
        assert vm.command("ide pio") == ""
        assert vm.command("sha256sum hda 65536") == f"{want_h64k}  hda"
        vm.send("exit 0")
        assert vm.wait() == 0
    assert h.read_bytes()[2 * MiB : 3 * MiB] == v.read_bytes()[: MiB]


def test_info_block_lists_drives_as_qemu_names_them(disks, tmp_path, run_dir):
    a, b, c = disks
    d = tmp_path / "d.img"
    d.write_bytes(bytes(MiB))
    with VM("-hda", str(a), "-cdrom", str(c), "-drive", f"file={b},if=virtio,format=raw,cache=none",
            "-drive", f"file={d},if=virtio,id=scratch,cache=unsafe,readonly=on", run_dir=run_dir) as vm:
        vm.wait_for("splitvm> ")
        text = monitor(run_dir, "info block")
        assert text.splitlines() == [
            f"ide0-hd0: {a} (raw)",
            "    Attached to:      ide0 (primary master), the guest's hda",
            "    Cache mode:       writeback",
            "",
            f"ide1-cd0: {c} (raw, read-only)",
            "    Attached to:      ide0 (secondary master), the guest's hdc",
            "    Cache mode:       writeback",
            "",
            f"virtio0: {b} (raw)",
            "    Attached to:      blk0, the guest's vda",
            "    Cache mode:       writeback, direct",
            "",
            f"scratch: {d} (raw, read-only)",
            "    Attached to:      blk1, the guest's vdb",
            "    Cache mode:       writeback, ignore flushes",
        ]
        rows = json.loads(ask(run_dir, '{"execute": "info block"}'))["return"]
        assert [(r["device"], r["guest"], r["ro"]) for r in rows] == [
            ("ide0-hd0", "hda", False), ("ide1-cd0", "hdc", True), ("virtio0", "vda", False), ("scratch", "vdb", True)]
        # the guest's own names agree
        assert [ln.split()[0] for ln in vm.command("lsblk").splitlines()] == ["hda", "hdc", "vda", "vdb"]
        vm.send("exit 0")
        assert vm.wait() == 0


def test_drive_if_none_with_device_front_ends(disks, tmp_path, run_dir):
    """QEMU's other spelling: -drive if=none,id=ID plus -device virtio-blk-pci|ide-hd|ide-cd,
    drive=ID. addr= places the virtio function (the guest names disks in PCI order), bus/unit
    place the IDE device, id= names the backend."""
    a, b, c = disks
    with VM("-drive", f"file={a},if=none,id=sys", "-drive", f"file={b},if=none,id=data",
            "-drive", f"file={c},if=none,id=cd,media=cdrom",
            "-device", "virtio-blk-pci,drive=data,addr=6,id=fast",
            "-device", "ide-hd,drive=sys,bus=ide.0,unit=1",
            "-device", "ide-cd,drive=cd,bus=ide.1,unit=0", run_dir=run_dir) as vm:
        vm.wait_for("splitvm> ")
        assert vm.command("lsblk").splitlines() == [
            f"hdb {4 * MiB} disk ide-dma", f"hdc {512 * 2048} cdrom atapi ro", f"vda {4 * MiB} disk virtio-blk"]
        assert vm.command("sha256sum hdb") == f"{sha(a)}  hdb"
        assert vm.command("sha256sum hdc") == f"{sha(c)}  hdc"
        assert vm.command("dd if=hdb of=vda bs=65536") == "64+0 records in\n64+0 records out"
        rows = {r["device"]: r for r in json.loads(ask(run_dir, '{"execute": "info block"}'))["return"]}
        assert rows["data"]["attached"] == "fast" and rows["sys"]["guest"] == "hdb" and rows["cd"]["guest"] == "hdc"
        pci = monitor(run_dir, "info pci")
        assert "Bus  0, device   6, function 0:" in pci and 'id "fast"' in pci
        assert "killed" in ask(run_dir, "backend kill fast")
        assert vm.command("sha256sum vda") == f"{sha(a)}  vda"
        vm.send("exit 0")
        assert vm.wait() == 0
    assert sha(b) == sha(a)
