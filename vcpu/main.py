"""The vcpu process: maps guest RAM and every sharing page, loads the guest, runs it.

Started by the supervisor with its memfds inherited and one JSON argument. Exits with
the guest's exit code; on a guest crash prints the registers and exits EXIT_CRASH.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import msgpack
import zmq

from broker.layout import map_io_page
from broker.notify import (
    AdaptiveSpin,
    done_endpoint,
    door_endpoint,
    irq_endpoint,
    pull_socket,
    push_socket,
    vcpu_control_endpoint,
)
from broker.sharing import SlotClient
from vcpu.accel import GuestCrash, GuestExit
from vcpu.elf import ElfError, load_elf
from vcpu.irq import InterruptState
from vcpu.memory import GuestMemory
from vcpu.platform import BootInfo, PlatformPorts
from vcpu.router import Backend, Router

EXIT_CRASH = 125


def _irq_thread(ctx: zmq.Context, run_dir: Path, irq: InterruptState) -> None:
    sock = pull_socket(ctx, irq_endpoint(run_dir))
    while True:
        _source, _line, level = msgpack.unpackb(sock.recv())
        irq.notify(bool(level))


def _control_thread(ctx: zmq.Context, run_dir: Path, router: Router, exits: callable) -> None:
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(vcpu_control_endpoint(run_dir))
    while True:
        req = msgpack.unpackb(sock.recv())
        if req == "stats":
            reply = router.exit_stats()
            reply["vcpu_exits"] = exits()
            reply["irq"] = {"pending": router.platform.irq.pending(), "raised": router.platform.irq.raised}
        else:
            reply = {"error": f"unknown request {req!r}"}
        sock.send(msgpack.packb(reply))


def build_router(cfg: dict, ctx: zmq.Context, irq: InterruptState, tsc_khz: int, trace: object) -> Router:
    run_dir = Path(cfg["run_dir"])
    ncpus = cfg["ncpus"]
    completions = [pull_socket(ctx, done_endpoint(run_dir, i)) for i in range(ncpus)]
    backends = []
    for d in cfg["backends"]:
        page = map_io_page(d["page_fd"])
        clients = [
            SlotClient(d["name"], page, i, push_socket(ctx, door_endpoint(run_dir, d["name"])), completions[i],
                       AdaptiveSpin())
            for i in range(ncpus)
        ]
        backends.append(Backend(d["name"], page, clients, [tuple(p) for p in d["ports"]], d["pci_bdf"],
                                coalesced_ports=list(d.get("coalesced_ports", []))))
        irq.add_shared_source(lambda p=page: p.ptr.irq_lines)
    boot = BootInfo(cfg["ram_size"], ncpus, tsc_khz, cfg["cmdline"].encode())
    return Router(PlatformPorts(boot, irq), backends, trace)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = json.loads(argv[0])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we end
    mem = GuestMemory(cfg["ram_fd"], cfg["ram_size"])
    entry = 0
    if cfg["accel"] != "qtest":
        try:
            entry = load_elf(Path(cfg["kernel"]), mem)
        except (OSError, ElfError) as e:
            print(f"splitvm: -kernel: {e}", file=sys.stderr)
            return 2
    ctx = zmq.Context()
    irq = InterruptState()
    trace = open(cfg["trace"], "a", buffering=1) if cfg.get("trace") else None  # noqa: SIM115
    accel = cfg["accel"]
    if accel == "kvm":
        from vcpu.kvm import KvmVm, run_vcpus

        vm = KvmVm(mem, cfg["ncpus"])
        vm.fast_string_io([p for d in cfg["backends"] for p in d.get("coalesced_ports", [])])
        tsc_khz = vm.tsc_khz()
        router = build_router(cfg, ctx, irq, tsc_khz, trace)
        exits = lambda: sum(v.exits for v in vm.vcpus)  # noqa: E731
        start = lambda: run_vcpus(vm, entry, router)  # noqa: E731
    elif accel == "qtest":
        from vcpu.qtest import QtestMachine

        router = build_router(cfg, ctx, irq, 1_000_000, trace)
        qtest = QtestMachine(mem, cfg["qtest"], irq)
        exits = lambda: qtest.exits  # noqa: E731
        start = lambda: qtest.run(0, router)  # noqa: E731
    else:
        from vcpu.tcg import TcgMachine

        tsc_khz = 1_000_000
        router = build_router(cfg, ctx, irq, tsc_khz, trace)
        machine = TcgMachine(mem, cfg["ncpus"])
        machine.fast_string_io([p for d in cfg["backends"] for p in d.get("coalesced_ports", [])])
        exits = lambda: machine.exits  # noqa: E731
        start = lambda: machine.run(entry, router)  # noqa: E731
    threading.Thread(target=_irq_thread, args=(ctx, Path(cfg["run_dir"]), irq), daemon=True).start()
    threading.Thread(target=_control_thread, args=(ctx, Path(cfg["run_dir"]), router, exits), daemon=True).start()
    try:
        code = start()
    except GuestExit as e:
        code = e.code
    except GuestCrash as e:
        print(f"splitvm: guest crashed: {e}", file=sys.stderr)
        code = EXIT_CRASH
    if trace is not None:
        trace.flush()
    sys.stdout.flush()
    os._exit(code)  # vCPU threads may still sit in KVM_RUN


if __name__ == "__main__":
    sys.exit(main())
