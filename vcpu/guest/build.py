"""Build the splitvm guest firmware (a freestanding x86-64 ELF) with gcc.

The ELF boots two ways: splitvm's vCPU loader enters ``_start64`` in long
mode at CPL 3, and ``qemu-system-x86_64 -kernel`` enters the 32-bit
multiboot stub.  See ``start.S``.

Run ``python -m vcpu.guest.build`` to build and print the ELF path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
OUTPUT_NAME = "splitvm-firmware.elf"
LINKER_SCRIPT = "firmware.ld"

# -mcmodel=small with -fno-pic/-no-pie: the image lives at 1 MiB, so all
# addresses fit in 32 bits.  -fno-tree-loop-distribute-patterns stops gcc
# from turning the loops in memset/memcpy into calls to themselves.
CFLAGS = [
    "-m64",
    "-std=gnu11",
    "-O2",
    "-Wall",
    "-Wextra",
    "-ffreestanding",
    "-fno-builtin",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-tree-loop-distribute-patterns",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-mcmodel=small",
]
LDFLAGS = [
    "-nostdlib",
    "-static",
    "-no-pie",
    "-Wl,--build-id=none",
    "-Wl,-z,max-page-size=0x1000",
    "-Wl,--no-warn-rwx-segments",
]


def default_out_dir() -> Path:
    """Per-user cache directory (never inside the repository)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "splitvm"


def sources() -> list[Path]:
    """Every file the ELF depends on, including this script (it holds the flags)."""
    files = [p for p in SOURCE_DIR.iterdir() if p.suffix in {".c", ".h", ".S", ".ld"}]
    return sorted(files) + [Path(__file__).resolve()]


def _is_fresh(out: Path) -> bool:
    try:
        built = out.stat().st_mtime
    except FileNotFoundError:
        return False
    return all(src.stat().st_mtime <= built for src in sources())


def build(out_dir: Path | None = None) -> Path:
    """Compile the firmware if needed and return the path of the ELF.

    Rebuilds only when a source is newer than the ELF.  Concurrent callers
    are safe: each links into its own temporary file and atomically renames
    it into place, so readers never see a partial ELF.
    """
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir()
    out = out_dir / OUTPUT_NAME
    if _is_fresh(out):
        return out

    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc not found: apt-get install gcc")

    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=f".{OUTPUT_NAME}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    units = [str(p) for p in sources() if p.suffix in {".c", ".S"}]
    cmd = [
        gcc,
        *CFLAGS,
        *LDFLAGS,
        "-T",
        str(SOURCE_DIR / LINKER_SCRIPT),
        "-o",
        str(tmp),
        *units,
    ]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"firmware build failed ({' '.join(cmd)}):\n{result.stdout}{result.stderr}")
        os.chmod(tmp, 0o755)  # mkstemp creates 0600; the ELF is meant to be shared
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main() -> int:
    """Entry point for ``python -m vcpu.guest.build``."""
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    print(build(out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
