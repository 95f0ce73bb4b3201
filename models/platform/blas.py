"""Put an optimized CBLAS under MLX on Linux before `mlx.core` is first imported.

The `mlx[cpu]` wheel links the reference (netlib) BLAS, which makes float32 matmuls very slow.
Loading OpenBLAS or MKL with RTLD_GLOBAL first makes MLX resolve its cblas_* symbols there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import platform
import sys
from dataclasses import dataclass

from models.platform.blas_forward import forwarding_library
from models.platform.openblas_wheel import bridged_library

log = logging.getLogger(__name__)

_OPENBLAS_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


@dataclass(frozen=True)
class BlasInfo:
    """What BLAS MLX uses: `library` is a path, or "reference", "accelerate" or "mlx-gpu"."""

    library: str
    vendor: str
    threads: int | None
    choice: str
    note: str = ""

    def as_dict(self, paths: bool = False) -> dict:
        """JSON-ready; the library by file name only unless `paths` (a path tells clients about the host)."""
        library = self.library if paths else os.path.basename(self.library)
        choice = self.choice if paths or not os.path.isabs(self.choice) else os.path.basename(self.choice)
        return {"library": library, "vendor": self.vendor, "threads": self.threads,
                "choice": choice, "note": self.note}


_state: BlasInfo | None = None


def _bundled_reference_blas() -> str | None:
    """Path of the reference libblas shipped in the mlx-cpu wheel, if that wheel is installed."""
    for entry in sys.path:
        hits = glob.glob(os.path.join(entry, "mlx_cpu.libs", "libblas*.so*"))
        if hits:
            return hits[0]
    return None


def _find_optimized() -> str | None:
    """The best optimized CBLAS on this machine: MKL in the environment, else the OpenBLAS wheel
    (models/platform/openblas_wheel.py), else a system OpenBLAS."""
    for pattern in ("lib/libmkl_rt.so*",):
        hits = sorted(glob.glob(os.path.join(sys.prefix, pattern)))
        if hits:
            return hits[0]
    wheel = forwarding_library() or bridged_library()
    if wheel is not None:
        return wheel
    arch = platform.machine()
    for candidate in _OPENBLAS_CANDIDATES:
        path = candidate.format(arch=arch)
        if os.path.exists(path):
            return path
    found = ctypes.util.find_library("openblas")
    return found


def _vendor_of(path: str) -> str:
    name = os.path.basename(path).lower()
    if "mkl" in name:
        return "mkl"
    if "openblas" in name:
        return "openblas"
    return "other"


def _set_threads(lib: ctypes.CDLL, vendor: str, threads: int | None) -> int | None:
    """Apply a thread count if one is given and report the count in force."""
    try:
        if vendor == "openblas":
            if threads:
                lib.openblas_set_num_threads(ctypes.c_int(threads))
            return int(lib.openblas_get_num_threads())
        if vendor == "mkl":
            if threads:
                lib.MKL_Set_Num_Threads(ctypes.c_int(threads))
            return int(lib.MKL_Get_Max_Threads())
    except AttributeError:
        return threads
    return threads


def configure_blas(choice: str = "auto", threads: int | None = None) -> BlasInfo:
    """Load the BLAS named by `choice` (auto | none | PATH) once, before MLX is imported.

    Later calls return the first result: MLX binds its BLAS when it is first imported.
    """
    global _state
    if _state is not None:
        return _state
    if "mlx.core" in sys.modules:
        _state = BlasInfo(_default_library(), "unknown", None, choice,
                          "mlx was imported before the BLAS could be chosen")
        return _state
    if sys.platform == "darwin":
        _state = BlasInfo("accelerate", "accelerate", None, choice)
        return _state
    reference = _bundled_reference_blas()
    if choice == "none":
        _state = BlasInfo("reference" if reference else "system", "netlib", None, choice)
        return _state
    if choice == "auto":
        if reference is None:
            # e.g. the CUDA wheel or a source build: MLX already links what it was built with
            _state = BlasInfo("system", "unknown", None, choice, "mlx does not bundle the reference BLAS")
            return _state
        path = _find_optimized()
        if path is None:
            _state = BlasInfo("reference", "netlib", None, choice,
                              "no optimized BLAS found; install libopenblas0-pthread for fast float32")
            return _state
    else:
        path = choice
    # OpenBLAS's threads spin 2^28 cycles (~0.1 s) after each product by default: after every prefill they took
    # a core from the decode steps (the 20 steps after one took 1.15x longer); 2^18 spans a prefill's products
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "18")
    vendor = _vendor_of(path)
    if threads and vendor == "openblas":
        # read when loaded: openblas_set_num_threads does not reach the count of the renamed copy MLX calls
        os.environ["OPENBLAS_NUM_THREADS"] = str(threads)
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        _state = BlasInfo("reference", "netlib", None, choice, f"could not load {os.path.basename(path)}")
        log.warning("BLAS %s could not be loaded; MLX stays on the reference BLAS", path)
        return _state
    _state = BlasInfo(path, vendor, _set_threads(lib, vendor, threads), choice)
    return _state


def _default_library() -> str:
    if sys.platform == "darwin":
        return "accelerate"
    return "reference" if _bundled_reference_blas() else "system"


def blas_choice(argv: list[str] | tuple[str, ...]) -> str:
    """The value of a `--blas` flag among command-line arguments (default auto)."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--blas", default="auto")
    return parser.parse_known_args(list(argv))[0].blas


def blas_info() -> BlasInfo:
    """What configure_blas chose, or what MLX uses by default if it was never called."""
    return _state or BlasInfo(_default_library(), "unknown", None, "unset")
