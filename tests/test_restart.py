"""The restart contract, first proof: the serial backend dies or stalls mid-stream, the guest loses nothing."""

import time

import pytest
from conftest import accels
from vmutil import VM, ask, backend_row, monitor

LINES = 20000


def expected_stream(n: int) -> str:
    return "".join(f"{i:06d}\n" for i in range(n))


def stream_text(vm: VM) -> str:
    """The console between the count command's echo and the next prompt, exactly."""
    text = vm.text.replace("\r\n", "\n")
    start = text.index(f"splitvm> count {LINES}\n") + len(f"splitvm> count {LINES}\n")
    end = text.index("splitvm> ", start)
    return text[start:end]


def served(run_dir) -> int:
    return backend_row(run_dir)["served"]


@pytest.mark.parametrize("accel", accels())
def test_kill_9_serial_mid_stream_loses_and_doubles_nothing(accel, run_dir):
    with VM("-accel", accel, "-append", f"count {LINES}; exit 5", run_dir=run_dir) as vm:
        vm.wait_for("000100")
        pids = []
        for _ in range(3):
            before = backend_row(run_dir)
            pids.append(before["pid"])
            assert "killed" in ask(run_dir, "backend kill serial0")
            assert f"{LINES - 1:06d}" not in vm.text  # the kill landed mid-stream
            time.sleep(0.25)
        after = backend_row(run_dir)
        assert after["restarts"] == 3
        assert after["pid"] not in pids
        assert vm.wait(180) == 5
        assert stream_text(vm) == expected_stream(LINES)


def test_stalled_backend_stop_and_cont(run_dir):
    with VM("-append", f"count {LINES}; exit 6", run_dir=run_dir) as vm:
        vm.wait_for("000100")
        assert monitor(run_dir, "backend stop serial0").strip() == "serial0: stopped"
        assert f"{LINES - 1:06d}" not in vm.text  # stalled mid-stream
        time.sleep(0.3)
        frozen = served(run_dir)
        length = len(vm.text)
        time.sleep(0.7)
        assert served(run_dir) == frozen  # nothing served while stopped: the guest waits
        assert len(vm.text) == length
        assert "stopped" in monitor(run_dir, "info backends")
        assert monitor(run_dir, "backend cont serial0").strip() == "serial0: continued"
        assert vm.wait(180) == 6
        assert stream_text(vm) == expected_stream(LINES)


def test_backend_that_keeps_dying_is_failed_and_reads_all_ones(run_dir):
    """After repeated deaths the backend is marked failed; its accesses complete with all-ones."""
    with VM("-append", "count 100000; exit 8", run_dir=run_dir) as vm:
        vm.wait_for("000050")
        state = None
        for _ in range(12):
            row = backend_row(run_dir)
            state = row["state"]
            if state == "failed":
                break
            if row["pid"] is not None:
                ask(run_dir, "backend kill serial0")
            time.sleep(0.15)
        assert state == "failed"
        time.sleep(0.5)
        row = backend_row(run_dir)
        assert row["pid"] is None and row["timeouts"] > 0
        text = monitor(run_dir, "info backends")
        assert text.splitlines()[1].split()[3] == "failed"
        # The guest is not hung: it finishes its count writing to a dead port, then exits.
        assert vm.wait(240) == 8
