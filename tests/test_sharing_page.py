"""The sharing-page protocol and the state region, with a real backend process."""

import json
import os
import signal
import time

import pytest
import zmq

from backends.devices import serial_spec
from broker.children import spawn
from broker.layout import (
    IO_PAGE_SIZE,
    KIND_PIO,
    SLOT_DONE,
    SLOT_POSTED,
    STATE_REGION_SIZE,
    create_region_fd,
    init_io_page,
    map_io_page,
    map_state_region,
)
from broker.notify import (
    AdaptiveSpin,
    broker_endpoint,
    done_endpoint,
    door_endpoint,
    irq_endpoint,
    pull_socket,
    push_socket,
)
from broker.sharing import SlotClient
from broker.state import StateReader, StateStore

SCR = 0x3FF
THR = 0x3F8


def test_publish_is_atomic_and_survives_a_restart():
    fd = create_region_fd("t-state", STATE_REGION_SIZE)
    region = map_state_region(fd)
    store = StateStore(region)
    assert store.model_state is None
    store.stage_output(b"hello")
    reader = StateReader(region)
    assert reader.drain_output() == b""  # staged but not published: invisible
    store.publish({"a": 1}, slot=0, seq=41)
    assert reader.drain_output() == b"hello"
    store.stage_output(b"lost")  # the backend dies before publishing these
    again = StateStore(map_state_region(fd))  # the restarted backend
    assert again.model_state == {"a": 1}
    assert again.applied(0, 41) and not again.applied(0, 42)
    again.stage_output(b"world")  # the replayed request writes at the same place
    again.publish({"a": 2}, slot=0, seq=42)
    assert reader.drain_output() == b"world"
    os.close(fd)


def test_input_ring_consumption_is_published():
    fd = create_region_fd("t-state", STATE_REGION_SIZE)
    region = map_state_region(fd)
    reader = StateReader(region)
    assert reader.feed_input(b"abc") == 3
    store = StateStore(region)
    assert store.take_input(2) == b"ab"
    store.publish({})
    assert StateStore(map_state_region(fd)).take_input(5) == b"c"
    os.close(fd)


class Rig:
    """A serial backend process on its memfds, and the vcpu side of its page."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.spec = serial_spec(0)
        self.page_fd = create_region_fd("t-io", IO_PAGE_SIZE)
        init_io_page(self.page_fd, 1)
        self.state_fd = create_region_fd("t-state", STATE_REGION_SIZE)
        self.page = map_io_page(self.page_fd)
        self.ctx = zmq.Context()
        self.done = pull_socket(self.ctx, done_endpoint(run_dir, 0))
        self.irq = pull_socket(self.ctx, irq_endpoint(run_dir))
        self.events = pull_socket(self.ctx, broker_endpoint(run_dir))
        self.client = SlotClient("serial0", self.page, 0, push_socket(self.ctx, door_endpoint(run_dir, "serial0")),
                                 self.done, AdaptiveSpin())
        self.proc = None

    def start(self):
        os.set_inheritable(self.page_fd, True)
        os.set_inheritable(self.state_fd, True)
        args = [
            "--spec", json.dumps(self.spec.to_dict()), "--page-fd", str(self.page_fd),
            "--state-fd", str(self.state_fd), "--run-dir", str(self.run_dir), "--ncpus", "1",
        ]
        self.proc = spawn("backends.host", args, (self.page_fd, self.state_fd))

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def close(self):
        if self.proc and self.proc.poll() is None:
            self.kill()
        self.ctx.destroy(linger=0)
        os.close(self.page_fd)
        os.close(self.state_fd)


@pytest.fixture
def rig(run_dir):
    r = Rig(run_dir)
    yield r
    r.close()


def test_round_trip_and_restart_with_a_posted_slot(rig):
    rig.start()
    rig.client.access(KIND_PIO, SCR, 1, True, b"\x5a")
    assert rig.client.access(KIND_PIO, SCR, 1, False, b"") == b"\x5a"
    served = rig.page.ptr.served
    rig.kill()
    # Post while the backend is dead: the slot waits in shared memory.
    slot = rig.page.ptr.slots[0]
    slot.kind, slot.addr, slot.size, slot.count, slot.is_write = KIND_PIO, SCR, 1, 1, 0
    slot.seq += 1
    slot.state = SLOT_POSTED
    time.sleep(0.2)
    assert slot.state == SLOT_POSTED
    rig.start()
    deadline = time.monotonic() + 10
    while slot.state != SLOT_DONE and time.monotonic() < deadline:
        time.sleep(0.005)
    assert slot.state == SLOT_DONE
    assert slot.data[0] == 0x5A  # the model state outlived the process
    assert rig.page.ptr.served == served + 1


def test_a_slot_already_applied_is_not_run_again(rig):
    """Death after publish, before DONE: the restarted backend returns the saved result."""
    rig.start()
    for b in b"AB":
        rig.client.access(KIND_PIO, THR, 1, True, bytes((b,)))
    rig.kill()
    region = map_state_region(rig.state_fd)
    reader = StateReader(region)
    assert reader.drain_output() == b"AB"
    # Re-post the last request with the seq it already had: it must not transmit again.
    slot = rig.page.ptr.slots[0]
    slot.state = SLOT_POSTED
    rig.start()
    deadline = time.monotonic() + 10
    while slot.state != SLOT_DONE and time.monotonic() < deadline:
        time.sleep(0.005)
    assert slot.state == SLOT_DONE
    time.sleep(0.1)
    assert reader.drain_output() == b""
    rig.client.access(KIND_PIO, THR, 1, True, b"C")
    assert reader.drain_output() == b"C"


def test_failed_backend_completes_with_all_ones(rig):
    rig.page.ptr.failed = 1
    t = time.monotonic()
    assert rig.client.access(KIND_PIO, SCR, 2, False, b"") == b"\xff\xff"
    assert time.monotonic() - t < 1
    assert rig.page.ptr.timeouts == 1
