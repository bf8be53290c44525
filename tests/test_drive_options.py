"""-drive, -hda..-hdd and -cdrom: every bad image or option is one clear line and exit 2."""

import fcntl
import os
import subprocess

import pytest
from vmutil import ROOT, env, processes_mentioning, splitvm_cmd


def run(*args, timeout=30):
    return subprocess.run(splitvm_cmd(*args), capture_output=True, text=True, cwd=ROOT, env=env(),
                          stdin=subprocess.DEVNULL, timeout=timeout)


@pytest.fixture
def img(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(1 << 20))
    return p


def check_refused(r, needle, run_dir=None):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("splitvm: "), r.stderr
    assert needle in lines[0], lines[0]
    assert r.stdout == ""  # the guest never started


def test_format_other_than_raw_names_qemu_img(img):
    check_refused(run("-drive", f"file={img},format=qcow2"), "qemu-img convert -O raw")


def test_a_qcow2_file_is_not_taken_for_raw(tmp_path):
    q = tmp_path / "x.qcow2"
    q.write_bytes(b"QFI\xfb" + bytes(4096))
    check_refused(run("-hda", str(q)), "is a qcow2 image, not raw: convert with  qemu-img convert")


def test_missing_unreadable_and_too_small(tmp_path, img):
    check_refused(run("-hda", str(tmp_path / "none.img")), "-hda: " + str(tmp_path / "none.img") + ": no such file")
    small = tmp_path / "small.img"
    small.write_bytes(b"x" * 100)
    check_refused(run("-drive", f"file={small},if=virtio"), "100 bytes is too small for a disk")
    iso = tmp_path / "cd.iso"
    iso.write_bytes(b"x" * 1024)
    check_refused(run("-cdrom", str(iso)), "1024 bytes is too small for a cdrom (at least 2048)")


def test_too_many_ide_drives_and_index_clashes(tmp_path):
    imgs = []
    for i in range(5):
        p = tmp_path / f"d{i}.img"
        p.write_bytes(bytes(4096))
        imgs.append(p)
    args = [a for p in imgs for a in ("-drive", f"file={p}")]
    check_refused(run(*args), "at most 4 IDE drives")
    check_refused(run("-drive", f"file={imgs[0]},index=1", "-hdb", str(imgs[1])), "IDE index 1 is already taken")
    check_refused(run("-drive", f"file={imgs[0]},index=7"), "IDE has 4 positions")


def test_second_writer_is_refused_by_the_lock(img):
    fd = os.open(img, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another program (or VM) writes this image
        check_refused(run("-hda", str(img)), "is in use by another process")
        check_refused(run("-drive", f"file={img},readonly=on"), "is open for writing elsewhere")
    finally:
        os.close(fd)
    check_refused(run("-hda", str(img), "-drive", f"file={img},if=virtio"), "one writer per image")


def test_bad_properties(img):
    check_refused(run("-drive", f"file={img},if=scsi"), "if=scsi is not supported")
    check_refused(run("-drive", f"file={img},media=tape"), "media=tape")
    check_refused(run("-drive", f"file={img},bogus=1"), "unknown property 'bogus'")
    check_refused(run("-drive", f"file={img},readonly=maybe"), "readonly=maybe")
    check_refused(run("-drive", "if=ide"), "needs file=PATH")
    check_refused(run("-drive", f"file={img},if=virtio,media=cdrom"), "media=cdrom needs if=ide")
    check_refused(run("-drive", f"file={img},id=d0", "-drive", f"file={img},readonly=on,id=d0"),
                  "id=d0 is already used by another drive")
    check_refused(run("-drive", f"file={img},id=0bad"), "id=0bad (a letter, then")
    check_refused(run("-device", "virtio-blk-pci,drive=d9"), "drive=d9: no -drive has that id")
    check_refused(run("-device", "virtio-blk-pci"), "needs drive=ID of a -drive if=none,id=ID")
    check_refused(run("-drive", f"file={img},id=d0", "-device", "virtio-blk-pci,drive=d0"),
                  "drive=d0 is already in use (it has if=ide; use if=none)")
    check_refused(run("-drive", f"file={img},if=none,id=d0", "-device", "virtio-blk-pci,drive=d0",
                      "-device", "ide-hd,drive=d0"), "drive=d0 is already in use (by another -device)")
    check_refused(run("-drive", f"file={img},if=none,id=d0", "-device", "ide-hd,drive=d0,bus=ide.2"),
                  "bus=ide.2 unit=0 (bus ide.0 or ide.1, unit 0 or 1)")
    check_refused(run("-drive", f"file={img},cache=direct"),
                  "cache=direct (one of writeback, none, writethrough, directsync, unsafe)")


def test_refusal_leaves_nothing_behind(tmp_path, img):
    rd = tmp_path / "rd"
    r = run("-run-dir", str(rd), "-hda", str(img), "-hdb", str(img))
    check_refused(r, "one writer per image")
    assert not rd.exists() and not processes_mentioning(str(rd))


def test_default_serial_is_the_same_every_boot(img):
    """A disk's serial (IDENTIFY words 10-19, virtio GET_ID) must not change between boots:
    guests name disks by it (/dev/disk/by-id). Python's hash() differs per process."""
    import sys

    code = ("from pathlib import Path; from broker.drives import Drive; "
            f"print(Drive(Path({str(img)!r})).as_backend_option()['serial'])")
    serials = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                              env={**env(), "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2", "3")}
    assert len(serials) == 1 and len(serials.pop()) == 12
