#!/bin/sh
# Boot a VM: the guest firmware's shell on this terminal (Ctrl-A x quits).
# Any splitvm option may follow, e.g. ./run.sh -m 256M -smp 2 -monitor stdio
set -e
cd "$(dirname "$0")"
deploy/setup.sh run
exec "${PYTHON:-python3}" -m broker.cli "$@"
