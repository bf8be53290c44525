"""`splitvm bench exit`: what one trapped access costs, against its two raw parts.

(a) a KVM exit handled inside the vcpu process: the guest reads the platform
    signature port, which the vcpu answers itself;
(b) a raw cross-process wake-up round trip: two processes ping-pong over a pair of
    eventfds (the cheapest blocking wake-up these machines have, DESIGN.md);
(c) the full six-step trapped access: the guest reads the UART scratch register,
    owned by the serial0 backend process.
(a) and (c) are timed by the guest itself with rdtsc around the `in` instruction
(firmware `bench pio`), so they include everything a driver waits for. The target
is c / (a + b) <= 1.5, medians from one run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time

from broker.children import spawn

TARGET_RATIO = 1.5
BENCH_LINE = re.compile(r"bench pio port=0x([0-9a-f]+) n=(\d+) median_ns=(\d+) p99_ns=(\d+)")


def eventfd_round_trip(n: int) -> tuple[float, float]:
    """Median and p99 (µs) of a blocking wake-up round trip between two processes."""
    ping, pong = os.eventfd(0), os.eventfd(0)
    child = spawn("broker.bench", ["--echo", str(ping), str(pong), str(n)], (ping, pong))
    samples = []
    try:
        for _ in range(n):
            t0 = time.perf_counter_ns()
            os.eventfd_write(ping, 1)
            os.eventfd_read(pong)
            samples.append(time.perf_counter_ns() - t0)
    finally:
        child.wait(10)
        os.close(ping)
        os.close(pong)
    samples.sort()
    return statistics.median(samples) / 1000, samples[int(len(samples) * 0.99)] / 1000


def _echo(ping: int, pong: int, n: int) -> None:
    for _ in range(n):
        os.eventfd_read(ping)
        os.eventfd_write(pong, 1)


def guest_pio(accel: str, n: int, spin: bool = True) -> dict[int, tuple[float, float]]:
    """Boot the firmware and let it time trapped reads of the platform port and of serial0."""
    cmds = f"bench pio 0x500 {n} 4; bench pio 0x3ff {n}; exit 0"
    env = dict(os.environ)
    if not spin:
        env["SPLITVM_SPIN_MAX_NS"] = "0"
    r = subprocess.run(
        [sys.executable, "-m", "broker.cli", "-accel", accel, "-serial", "stdio", "-append", cmds],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600, env=env,
    )
    if r.returncode != 0:
        raise RuntimeError(f"the benchmark VM failed ({r.returncode}): {r.stderr.strip()}")
    out = {}
    for m in BENCH_LINE.finditer(r.stdout):
        out[int(m.group(1), 16)] = (int(m.group(3)) / 1000, int(m.group(4)) / 1000)
    if set(out) != {0x500, 0x3FF}:
        raise RuntimeError(f"the benchmark VM printed no result:\n{r.stdout}")
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["--echo"]:
        _echo(int(argv[1]), int(argv[2]), int(argv[3]))
        return 0
    if argv[:1] == ["disk"]:
        from broker.bench_disk import main as disk_main

        return disk_main(argv[1:])
    ap = argparse.ArgumentParser(prog="splitvm bench")
    ap.add_argument("what", choices=["exit"])
    ap.add_argument("-accel", default="kvm", choices=["kvm", "tcg"])
    ap.add_argument("-n", type=int, default=20000, help="accesses per measurement (<= 65536)")
    a = ap.parse_args(argv)
    if not 100 <= a.n <= 65536:
        print("splitvm: bench: -n: 100 to 65536", file=sys.stderr)
        return 2
    guest = guest_pio(a.accel, a.n)
    wake = eventfd_round_trip(a.n)
    no_spin = guest_pio(a.accel, a.n, spin=False)
    rows = [
        ("(a) exit handled in the vcpu process", guest[0x500]),
        ("(b) cross-process wake-up (eventfd)", wake),
        ("(c) six-step access to serial0", guest[0x3FF]),
        ("    (c) with spinning off, for contrast", no_spin[0x3FF]),
    ]
    ratio = guest[0x3FF][0] / (guest[0x500][0] + wake[0])
    today = datetime.date.today().isoformat()
    print(f"splitvm bench exit: accel={a.accel} n={a.n} date={today} host={platform.node()} "
          f"cpus={os.cpu_count()} kernel={platform.release()}")
    print(f"{'path':<40} {'median_us':>10} {'p99_us':>10}")
    for name, (med, p99) in rows:
        print(f"{name:<40} {med:>10.1f} {p99:>10.1f}")
    verdict = "ok" if ratio <= TARGET_RATIO else "ABOVE TARGET"
    print(f"ratio c / (a + b), medians: {ratio:.2f}  (target <= {TARGET_RATIO}: {verdict}); "
          f"c / a: {guest[0x3FF][0] / guest[0x500][0]:.2f}; "
          f"spinning off: {no_spin[0x3FF][0] / (guest[0x500][0] + wake[0]):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
