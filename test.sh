#!/bin/sh
# Run the whole test suite (benchmarks marked slow are left out; run them with splitvm bench).
set -e
cd "$(dirname "$0")"
deploy/setup.sh test
exec "${PYTHON:-python3}" -m pytest -q "$@"
