import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    return d


def kvm_ok() -> bool:
    from vcpu.kvm import kvm_unavailable_reason

    return kvm_unavailable_reason() is None


def accels() -> list:
    """Integration tests run under kvm and tcg; kvm skips with its reason where it is missing."""
    from vcpu.kvm import kvm_unavailable_reason

    reason = kvm_unavailable_reason()
    return [
        pytest.param("kvm", marks=pytest.mark.skipif(reason is not None, reason=reason or "")),
        "tcg",
    ]


@pytest.fixture(autouse=True)
def no_leftover_children():
    """Every test ends the processes it started: none of our children may survive it."""
    yield
    me = os.getpid()
    leftovers = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me and fields[0] != "Z":
                leftovers.append(p.name)
    assert not leftovers, f"test left child processes behind: {leftovers}"
