"""A compile cache of MLX's fused CPU kernels that no other process can poison.

MLX's CPU backend compiles each fused kernel with g++ into `$TMPDIR/mlx/<version>/cpu/lib<name>.so`,
written in place and loaded from there by every later process. One stopped mid-compile leaves a
truncated library behind, and from then on every process that needs that kernel fails to load it
("file too short"). So dtype-serve keeps its own folder per user and instruction set (MLX adds the
version below it; on x86-64 with AVX2 and FMA the kernels are built for them: `instruction_set`),
has MLX compile through a wrapper that writes each library under a temporary name and renames it
once complete (ignoring SIGINT/SIGTERM meanwhile, so a signal to the process group cannot cut it off),
removes incomplete libraries at start, and retries a kernel once after removing one that fails to load.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import re
import shutil
import struct
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "DTYPE_SERVE_COMPILE_CACHE"  # an operator's choice of folder; else <DTYPE_SERVE_CACHE>/mlx-compile
_ELF_MAGIC = b"\x7fELF"
_LOAD_FAILURE = re.compile(r"Could not load C\+\+ shared library (\S+?\.so)\b")
_folder: Path | None = None


def _default_folder() -> Path:
    from models.platform.openblas_wheel import cache_root

    return cache_root() / "mlx-compile"


def use_private_compile_cache() -> Path:
    """Point MLX's kernel compiles at this user's own folder and sweep it; idempotent. Python's own
    temporary files stay where they were. Returns the folder (MLX writes under `mlx/<version>/cpu`)."""
    global _folder
    if _folder is not None:
        return _folder
    tempfile.gettempdir()  # pins Python's temp folder before TMPDIR changes below
    wanted = Path(os.environ.get(ENV) or _default_folder())
    try:
        wanted.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:  # a read-only home (an image): a per-user folder under the system temp instead
        wanted = Path(tempfile.gettempdir()) / f"dtype-serve-{os.getuid()}" / "mlx-compile"
        wanted.mkdir(parents=True, exist_ok=True, mode=0o700)
    tag, flags = instruction_set()
    wanted = wanted / tag  # kernels built for one instruction set never load on a CPU without it
    wanted.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.environ["TMPDIR"] = str(wanted)  # std::filesystem::temp_directory_path() reads it per compile
    _folder = wanted
    wrapper = install_atomic_compiler(wanted / "bin", flags)
    if wrapper is not None and os.environ.get("PATH", "").split(os.pathsep)[0] != str(wrapper.parent):
        os.environ["PATH"] = os.pathsep.join((str(wrapper.parent), os.environ.get("PATH", "")))
    removed = sweep(wanted)
    if removed:
        log.warning("removed %d truncated MLX kernel libraries from the compile cache", len(removed))
    return wanted


def instruction_set() -> tuple[str, str]:
    """(folder tag, g++ flags) of the fused kernels' build: on an x86-64 CPU with AVX2 and FMA, those (as MLX's
    own AVX2 builds ask) and MLX's exp inlined, else none. The flags never fuse a product and a sum that MLX's
    plain ops round apart (-ffp-contract=off), so fused kernels stay bitwise MLX's ops; the tag names them, so
    a change of flags builds every kernel again."""
    # without them MLX's exp (6 fma calls) called libm's fmaf through the PLT, and libmlx's exp, not its copy
    if platform.machine() not in ("x86_64", "AMD64"):
        return "baseline", ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    if {"avx2", "fma"} <= set(flags):
        wanted = "-mavx2 -mfma -ffp-contract=off -finline-limit=1000"
        return f"x86-64-avx2-fma-{hashlib.sha1(wanted.encode()).hexdigest()[:8]}", wanted
    return "baseline", ""


def kernel_folders(root: Path) -> list[Path]:
    """The `mlx/<version>/cpu` folders under `root`, one per MLX version that compiled there."""
    return sorted(p for p in (root / "mlx").glob("*/cpu") if p.is_dir())


def is_complete_library(path: Path) -> bool:
    """Whether `path` is an ELF file whose section headers (written last) lie within it: a library
    cut off while it was written fails this."""
    try:
        with path.open("rb") as f:
            header = f.read(64)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(header) < 52 or header[:4] != _ELF_MAGIC:
        return False
    order = "<" if header[5] == 1 else ">"
    if header[4] == 2:  # 64-bit
        if len(header) < 64:
            return False
        shoff, = struct.unpack_from(order + "Q", header, 0x28)
        shentsize, shnum = struct.unpack_from(order + "HH", header, 0x3A)
    else:
        shoff, = struct.unpack_from(order + "I", header, 0x20)
        shentsize, shnum = struct.unpack_from(order + "HH", header, 0x2E)
    return 0 < shoff and shoff + shentsize * shnum <= size


def sweep(root: Path) -> list[Path]:
    """Remove every incomplete kernel library under `root`, and the parts of compiles that were
    stopped an hour ago or more (a compile takes seconds); returns the libraries removed."""
    removed = []
    for folder in kernel_folders(root):
        for library in folder.glob("*.so"):
            if not is_complete_library(library):
                library.unlink(missing_ok=True)
                removed.append(library)
        for part in folder.glob("*.so.part.*"):
            with contextlib.suppress(OSError):
                if time.time() - part.stat().st_mtime > 3600:
                    part.unlink()
    return removed


def remove_failed_library(error: BaseException) -> bool:
    """If `error` is MLX failing to load a kernel library from our compile cache, remove that
    library and any other incomplete one (the next use compiles them again) and return True."""
    match = _LOAD_FAILURE.search(str(error))
    if match is None or _folder is None:
        return False
    library = Path(match.group(1))
    if not library.resolve().is_relative_to(_folder.resolve()):
        return False  # never remove files outside the folder we own
    library.unlink(missing_ok=True)
    others = sweep(_folder)  # whatever cut that one off may have cut others
    log.warning("removed an MLX kernel library that failed to load (%s) and %d more", library.name, len(others))
    return True


_WRAPPER = """#!/bin/sh
# dtype-serve: MLX's kernel compile, its library written under a temporary name and renamed once
# complete, so that no process ever loads a library cut off halfway (models/platform/compile_cache.py).
trap '' INT TERM HUP
out= prev=
for arg do
  shift
  if [ "$prev" = -o ]; then out=$arg; arg=$arg.part.$$; fi
  set -- "$@" "$arg"
  prev=$arg
done
[ -n "$out" ] || exec {compiler} {flags} "$@"
{compiler} {flags} "$@" && mv -f "$out.part.$$" "$out" && exit 0
status=$?; rm -f "$out.part.$$"; exit $status
"""


def install_atomic_compiler(folder: Path, flags: str = "") -> Path | None:
    """Write the `g++` wrapper that MLX finds first on PATH, adding `flags` to its command; None where there
    is no g++ to wrap (MLX then finds none either and decodes unfused)."""
    search = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != str(folder))
    compiler = shutil.which("g++", path=search)
    if compiler is None:
        return None
    wrapper = folder / "g++"
    text = _WRAPPER.replace("{compiler}", "'" + compiler.replace("'", "'\\''") + "'").replace("{flags}", flags)
    try:
        if not wrapper.exists() or wrapper.read_text() != text:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            part = folder / f"g++.{os.getpid()}"
            part.write_text(text)
            part.chmod(0o700)
            part.replace(wrapper)
    except OSError as e:
        log.warning("cannot write the compiler wrapper (%s): MLX compiles in place", e)
        return None
    return wrapper
