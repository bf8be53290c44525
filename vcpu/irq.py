"""Interrupt-controller state kept in the vcpu: line levels raised/lowered by backends.

Several sources may share a line (wired-OR of level-triggered PCI INTx); a line is
asserted while any source holds it. A backend's level lives in its sharing page
(written before its message), so a lost or late message delays a wake-up but never
loses a level. The guest waits for a line through the platform port (no interrupt is
ever injected: the firmware runs at CPL 3, DESIGN.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class InterruptState:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.raised = 0  # how many raise messages arrived (info irq)
        self.shared: list[Callable[[], int]] = []

    def add_shared_source(self, lines: Callable[[], int]) -> None:
        """A source whose asserted lines (a bitmask) are read from shared memory."""
        self.shared.append(lines)

    def notify(self, level: bool) -> None:
        """A backend's message: its level is already in its sharing page; wake waiters."""
        with self.cond:
            if level:
                self.raised += 1
            self.cond.notify_all()

    def pending(self) -> int:
        """Bitmask of asserted lines."""
        mask = 0
        for lines in self.shared:
            mask |= lines()
        return mask

    def wait(self, timeout_s: float) -> int:
        with self.cond:
            if not self.pending():
                self.cond.wait(timeout_s)
            return self.pending()
