"""The firmware booted as a user boots it: a real process group on kvm and on tcg."""

import json
import os
import signal
import subprocess

import pytest
from conftest import accels
from vmutil import ROOT, VM, env, monitor, processes_mentioning, splitvm_cmd, wait_gone


@pytest.mark.parametrize("accel", accels())
def test_shell_commands_and_exit_code(accel, run_dir):
    with VM("-accel", accel, "-m", "256M", "-nographic", "-serial", "stdio", run_dir=run_dir) as vm:
        vm.wait_for("splitvm> ")
        assert vm.command("echo hello   splitvm world") == "hello splitvm world"
        assert vm.command("mem") == "RAM: 256 MiB"
        assert vm.command("lspci").splitlines()[0] == "00:00.0 0600: 8086:1237 Host bridge"
        assert "lspci" in vm.command("help")
        assert vm.command("frobnicate") == "unknown command: frobnicate"
        vm.send("exit 42")
        assert vm.wait() == 42


@pytest.mark.parametrize("accel", accels())
def test_piped_input_runs_to_the_guests_exit(accel):
    r = subprocess.run(splitvm_cmd("-accel", accel), input=b"echo hi\nexit 7\n", capture_output=True, cwd=ROOT,
                       env=env(), timeout=120)
    lines = r.stdout.decode().replace("\r\n", "\n").splitlines()
    assert "hi" in lines
    assert r.returncode == 7, r.stderr


def test_append_runs_commands_before_the_prompt():
    r = subprocess.run(splitvm_cmd("-append", "echo one;echo two;poweroff"), input=b"", capture_output=True,
                       cwd=ROOT, env=env(), timeout=120)
    text = r.stdout.decode().replace("\r\n", "\n")
    assert "splitvm> echo one\none\nsplitvm> echo two\ntwo\nsplitvm> poweroff" in text
    assert r.returncode == 0


def test_append_up_to_the_firmware_limit_runs_whole():
    """A command line the firmware's buffer just holds runs to its last command."""
    filler = "echo " + "y" * 90 + ";"
    cmdline = filler * 42 + "echo last;exit 5"
    cmdline = "echo " + "z" * (4095 - len(cmdline) - 6) + ";" + cmdline
    assert len(cmdline) == 4095
    r = subprocess.run(splitvm_cmd("-append", cmdline), input=b"", capture_output=True, cwd=ROOT, env=env(),
                       timeout=120)
    text = r.stdout.decode().replace("\r\n", "\n")
    assert "splitvm> echo last\nlast\n" in text and "cut" not in text
    assert r.returncode == 5, r.stderr


def test_smp_secondary_vcpus_park_and_info_counts_them():
    r = subprocess.run(splitvm_cmd("-smp", "2", "-append", "info;exit 3"), input=b"", capture_output=True,
                       cwd=ROOT, env=env(), timeout=120)
    text = r.stdout.decode()
    assert "platform: splitvm" in text
    assert "vCPUs: 2" in text
    assert r.returncode == 3


def test_user_kernel_elf(tmp_path):
    """-kernel boots a user's own freestanding guest, built as the README shows."""
    elf = tmp_path / "hello.elf"
    subprocess.run(["gcc", "-O2", "-ffreestanding", "-nostdlib", "-static", "-fno-pic", "-no-pie", "-mno-red-zone",
                    "-Wl,-Ttext=0x200000", "-Wl,--build-id=none", "-o", str(elf), str(ROOT / "examples" / "hello.c")],
                   check=True)
    r = subprocess.run(splitvm_cmd("-kernel", str(elf)), input=b"", capture_output=True, cwd=ROOT, env=env(),
                       timeout=60)
    assert r.stdout.decode() == "Hello from my own guest\n"
    assert r.returncode == 9


@pytest.mark.parametrize(
    "args, needle",
    [
        (["-m", "lots"], "-m: invalid size 'lots'"),
        (["-m", "1M"], "-m: 1M is out of range"),
        (["-smp", "0"], "-smp: expected a vCPU count"),
        (["-accel", "hvf"], "-accel: unknown accelerator 'hvf'"),
        (["-kernel", "/nonexistent.elf"], "-kernel: /nonexistent.elf: no such file"),
        (["-m"], "-m: needs a value"),
        (["-frob", "1"], "-frob: unknown option"),
        (["-serial", "tcp:1.2.3.4"], "-serial: unsupported serial backend"),
        (["-trace", "disk"], "-trace: only the 'io' trace exists"),
        (["--config", "/nonexistent.toml"], "--config: /nonexistent.toml: no such file"),
        (["-append", "x" * 4096], "-append: 4096 bytes; the firmware takes at most 4095"),
    ],
)
def test_bad_options_name_themselves_and_exit_2(args, needle, tmp_path):
    r = subprocess.run(splitvm_cmd("-run-dir", str(tmp_path / "rd"), *args), capture_output=True, text=True,
                       cwd=ROOT, env=env(), timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"splitvm: {r.stderr.strip()[9:]}"]
    assert needle in r.stderr
    assert not (tmp_path / "rd").exists()  # nothing was started
    assert not processes_mentioning(str(tmp_path / "rd"))


def test_bad_config_key_and_good_config(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('memory = "64M"\ncolour = "blue"\n')
    r = subprocess.run(splitvm_cmd("--config", str(bad)), capture_output=True, text=True, cwd=ROOT, env=env())
    assert r.returncode == 2 and "unknown key 'colour'" in r.stderr
    good = tmp_path / "vm.toml"
    good.write_text('[machine]\nmemory = "64M"\nsmp = 1\nappend = "mem;exit 4"\n')
    r = subprocess.run(splitvm_cmd("--config", str(good)), input=b"", capture_output=True, cwd=ROOT, env=env(),
                       timeout=60)
    assert "RAM: 64 MiB" in r.stdout.decode()
    assert r.returncode == 4


def test_shipped_configs_parse():
    from broker.options import parse_args

    for name in ("default.toml", "example.toml"):
        m = parse_args(["--config", str(ROOT / "deploy" / name)])
        assert m.ram_size >= 2 << 20


def test_monitor_text_and_json(run_dir):
    with VM(run_dir=run_dir) as vm:
        vm.wait_for("splitvm> ")
        assert vm.command("echo warm") == "warm"
        text = monitor(run_dir, "info backends")
        header, row = text.strip().splitlines()
        assert header.split() == ["name", "kind", "pid", "state", "restarts", "served", "all-ones"]
        assert row.split()[:5] == ["serial0", "serial", row.split()[2], "running", "0"]
        rows = json.loads(monitor(run_dir, '{"execute": "info backends"}'))["return"]
        assert rows[0]["name"] == "serial0" and rows[0]["served"] > 0
        assert "Host bridge: PCI device 8086:1237" in monitor(run_dir, "info pci")
        exits = monitor(run_dir, "info exits")
        serial_row = [ln for ln in exits.splitlines() if ln.startswith("serial0")][0].split()
        assert int(serial_row[1]) > 10 and float(serial_row[2]) > 0 and float(serial_row[3]) >= float(serial_row[2])
        assert "unknown command" in monitor(run_dir, "info frob")
        assert json.loads(monitor(run_dir, '{"execute": "backend kill nothere"}'))["error"].startswith("no backend")
        monitor(run_dir, "quit")
        assert vm.wait() == 0


def test_monitor_stdio_takes_lines():
    r = subprocess.run(splitvm_cmd("-monitor", "stdio", "-serial", "none"), input=b"info backends\nquit\n",
                       capture_output=True, cwd=ROOT, env=env(), timeout=60)
    assert "serial0" in r.stdout.decode()
    assert r.returncode == 0


def test_trace_io_writes_one_line_per_access(tmp_path):
    trace = tmp_path / "io.trace"
    r = subprocess.run(splitvm_cmd("-trace", f"io={trace}", "-append", "echo x;exit 0"), input=b"",
                       capture_output=True, cwd=ROOT, env=env(), timeout=60)
    assert r.returncode == 0
    lines = trace.read_text().splitlines()
    assert len(lines) > 10
    f = dict(kv.split("=") for kv in lines[-1].split()[1:] if "=" in kv)
    assert f["dev"] == "serial0"
    for step in ("exit", "post", "backend", "complete", "resume", "total"):
        assert step in f
    total = float(f["total"])
    parts = [float(f[s]) for s in ("exit", "post", "backend", "complete", "resume") if f[s] != "-"]
    assert abs(sum(parts) - total) < 0.5


def test_sigkill_of_splitvm_ends_every_child(run_dir):
    vm = VM(run_dir=run_dir)
    try:
        vm.wait_for("splitvm> ")
        children = processes_mentioning(str(run_dir))
        assert len(children) >= 2  # vcpu and serial0
        os.kill(vm.proc.pid, signal.SIGKILL)
        vm.proc.wait(10)
        assert not wait_gone(str(run_dir)), "children outlived a SIGKILLed splitvm"
    finally:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)  # its owner was SIGKILLed: nobody else can
        vm.close()


def test_sigterm_ends_cleanly(run_dir):
    with VM(run_dir=run_dir) as vm:
        vm.wait_for("splitvm> ")
        vm.proc.send_signal(signal.SIGTERM)
        assert vm.wait(20) == 0
        assert "terminating on signal 15" in vm.err.decode()


def test_unowned_ports_read_all_ones_and_count(run_dir):
    with VM(run_dir=run_dir) as vm:
        vm.wait_for("splitvm> ")
        before = json.loads(monitor(run_dir, '{"execute": "info exits"}'))["return"]["unowned"]
        assert vm.command("in 0x80") == "0xff"  # nobody owns port 0x80
        assert vm.command("in 0x84 l") == "0xffffffff"
        vm.command("out 0x80 0x12")  # dropped
        assert vm.command("peek 0xf0000000") == "0xffffffff"  # no BAR there
        after = json.loads(monitor(run_dir, '{"execute": "info exits"}'))["return"]["unowned"]
        assert after["pio_read"] == before["pio_read"] + 2
        assert after["pio_write"] == before["pio_write"] + 1
        assert after["mmio_read"] == before["mmio_read"] + 1
        vm.send("exit 0")
        assert vm.wait() == 0

def test_systemd_unit_runs_a_vm_the_way_it_says(tmp_path):
    """ExecStart of deploy/splitvm@.service, with %i filled in, parses and boots."""
    unit = (ROOT / "deploy" / "splitvm@.service").read_text()
    line = next(ln for ln in unit.splitlines() if ln.startswith("ExecStart="))
    argv = line.split("=", 1)[1].split()
    assert argv[0] == "/usr/local/bin/splitvm"
    cfg = tmp_path / "web.toml"
    cfg.write_text('[machine]\nmemory = "64M"\nappend = "echo from-systemd;poweroff"\n')
    args = [a.replace("/etc/splitvm/%i.toml", str(cfg)).replace("/run/splitvm/%i", str(tmp_path / "run"))
            for a in argv[1:]]
    r = subprocess.run(splitvm_cmd(*args), stdin=subprocess.DEVNULL, capture_output=True, cwd=ROOT, env=env(),
                       timeout=60)
    assert "from-systemd" in r.stdout.decode() and r.returncode == 0
    assert not (tmp_path / "run").exists()
    assert "KillMode=control-group" in unit and "Restart=on-failure" in unit


def test_missing_kvm_falls_back_to_tcg_with_one_line_or_errors_when_asked_for():
    e = env()
    e["SPLITVM_KVM_DEVICE"] = "/nonexistent/kvm"
    r = subprocess.run(splitvm_cmd("-append", "exit 3"), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       cwd=ROOT, env=e, timeout=120)
    assert r.returncode == 3
    assert r.stderr.strip().splitlines() == [
        "splitvm: KVM unavailable: /nonexistent/kvm does not exist (load the kvm module, or use -accel tcg); "
        "using -accel tcg"]
    r = subprocess.run(splitvm_cmd("-accel", "kvm"), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       cwd=ROOT, env=e, timeout=60)
    assert r.returncode == 1 and "-accel kvm: /nonexistent/kvm does not exist" in r.stderr


def test_missing_gcc_says_what_to_install(tmp_path):
    e = env()
    e["PATH"] = str(tmp_path)  # no gcc anywhere
    e["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # no firmware built yet
    r = subprocess.run(splitvm_cmd(), stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=ROOT, env=e,
                       timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip() == "splitvm: gcc not found: apt-get install gcc"
