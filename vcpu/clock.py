"""One clock for every process on the I/O path: CLOCK_MONOTONIC is system-wide."""

import time

now_ns = time.monotonic_ns
