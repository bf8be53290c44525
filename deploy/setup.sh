#!/bin/sh
# Install what splitvm needs on a fresh Debian machine, only where it is missing.
#   deploy/setup.sh run    gcc (the firmware), the Python packages
#   deploy/setup.sh test   the same, plus qemu-system-x86 (drivers checked on QEMU's devices) and pytest
set -e
cd "$(dirname "$0")/.."
want="$1"
PY="${PYTHON:-python3}"

apt_missing=""
command -v gcc >/dev/null 2>&1 || apt_missing="$apt_missing gcc libc6-dev"
if [ "$want" = test ]; then
    command -v qemu-system-x86_64 >/dev/null 2>&1 || apt_missing="$apt_missing qemu-system-x86"
    command -v mkfs.fat >/dev/null 2>&1 || [ -x /sbin/mkfs.fat ] || apt_missing="$apt_missing dosfstools"
fi
if [ -n "$apt_missing" ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "splitvm setup: please install:$apt_missing (apt-get install$apt_missing)" >&2; exit 1
    fi
    echo "splitvm setup: apt-get install$apt_missing" >&2
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $apt_missing >/dev/null
fi

mods="zmq, msgpack, cffi, pyroute2, unicorn"
extra=""
[ "$want" = test ] && mods="$mods, pytest, pytest_timeout" && extra="[test]"
if ! "$PY" -c "import $mods" 2>/dev/null || ! command -v splitvm >/dev/null 2>&1; then
    echo "splitvm setup: pip install -e .$extra" >&2
    "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore -e ".$extra" >&2
fi
