"""The OpenBLAS wheel with MLX's few-row float32 products forwarded to matrix-vector products, and quantized
products read from the packed weight.

MLX multiplies every float32 matrix with `cblas_sgemm`, and a decode step's products have one row per
sequence. OpenBLAS's sgemm packs the whole weight before multiplying, so a one-row product reads and
writes it twice: a 512 x 32,000 output layer took 6.8 ms there against 1.4 ms through `sgemv`, which streams the
weight once (two threads; two-row products 1.1-2x faster as two sgemv calls, four rows about even). Served
decoding: `python -m bench.blas --against <the plain renamed wheel>` (BENCHMARKS.md, "One-row products").
A small C library (csrc/blas_forward.c), compiled once into the user's cache for this machine's CPU, defines the
`cblas_sgemm` MLX binds: a product whose alpha is `QUANTIZED_ALPHA` multiplies by a registered quantized weight
(quantized_kernel.py); up to `FEW_ROWS` rows times a row-major float32 weight, its own product streams the
weight once per 8 rows (so float32 weights stay row-major under it: models/decode/cpu_layout.py); other products
of up to `MAX_ROWS` rows take sgemv per row; the rest the wheel's own sgemm, renamed in a copy of the wheel.
Results are the same sums in another order: equal within float32 rounding, not bitwise.

Where no C compiler is found (or the build fails, remembered per wheel) the plain renamed wheel is used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from models.platform.openblas_wheel import PREFIX, RENAMED, cache_dir, make_renamed_copy, patchelf_path, wheel_library

log = logging.getLogger(__name__)

MAX_ROWS = 2
# up to this many rows times a row-major weight, the library's own float32 product (from 24 rows OpenBLAS's sgemm
# was faster on llama-25m's shapes); B of at least FEW_MIN_SIZE elements (smaller: attention's products)
FEW_ROWS = 16
FEW_MIN_SIZE = 1 << 16
SGEMM_IMPL = "dtype_serve_wheel_sgemm"  # the wheel's sgemm, under a name MLX does not bind

SOURCE = Path(__file__).with_name("csrc") / "blas_forward.c"
# alpha of the products that read a registered quantized weight (csrc/blas_forward.c; models/decode/cpu_quantized.py)
QUANTIZED_ALPHA = -8191.75
MAX_IN_DIMS = 65536  # a quantized weight's widest input (the kernel's per-thread scale buffers)


# -march=native: built on the machine that runs it, keyed by its CPU (a shared cache serves each CPU its own build)
COMPILE_FLAGS = ("-O3", "-march=native", "-pthread", "-shared", "-fPIC")
# tried where the compiler refuses -march=native: its generic vectors
FALLBACK_FLAGS = (("-O3", "-pthread", "-shared", "-fPIC"),)


def _defines() -> list[str]:
    return [f"-DSGEMM_IMPL={SGEMM_IMPL}", f"-DMAX_ROWS={MAX_ROWS}", f"-DQUANTIZED_ALPHA={QUANTIZED_ALPHA!r}f",
            f"-DMAX_IN_DIMS={MAX_IN_DIMS}", f"-DFEW_ROWS={FEW_ROWS}", f"-DFEW_MIN_SIZE={FEW_MIN_SIZE}"]


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(lines)))


def _compiler_identity(compiler: str) -> str:
    path = shutil.which(compiler) or compiler
    try:
        return f"{os.path.realpath(path)}:{os.stat(path).st_mtime_ns}"
    except OSError:
        return path


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def forwarding_library() -> str | None:
    """Path of the forwarding library (built on first use, beside a copy of the wheel it links to); None
    where it cannot be built, so that the caller uses the plain renamed wheel."""
    if not sys.platform.startswith("linux"):
        return None
    source = wheel_library()
    compiler = _compiler()
    if source is None or compiler is None:
        return None
    stat = source.stat()
    # the compiler too: a failed build is remembered per compiler, so installing or upgrading one tries again
    key = (f"{source}:{stat.st_size}:{stat.st_mtime_ns}:{_defines()}:{SOURCE.read_text()}:{_cpu_signature()}:"
           f"{_compiler_identity(compiler)}")
    tag = hashlib.sha256(key.encode()).hexdigest()[:12]
    target = cache_dir() / f"libopenblas-forward-{tag}.so"
    if target.exists():
        return str(target)
    failed = target.with_name(target.name + ".failed")
    if failed.exists():
        return None
    try:
        return str(_build(source, target, tag, compiler))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("could not build the BLAS forwarding (few-row products, the CPU's quantized kernel) (%s); "
                    "using the plain OpenBLAS wheel", e)
        try:
            failed.write_text(f"{type(e).__name__}: {e}\n")
        except OSError:
            pass
        return None


def _build(source: Path, target: Path, tag: str, compiler: str,
           flag_sets: tuple[tuple[str, ...], ...] = (COMPILE_FLAGS, *FALLBACK_FLAGS)) -> Path:
    """The wheel copied with MLX's names (its sgemm as SGEMM_IMPL), and the forwarding library linked to it
    by an rpath of its own folder; both renamed into place once complete."""
    patchelf = patchelf_path()
    if patchelf is None:
        raise OSError("patchelf not found")
    wheel_copy = target.with_name(f"libopenblas-forward-{tag}-wheel.so")
    renames = {f"{PREFIX}{name}": name for name in RENAMED} | {f"{PREFIX}cblas_sgemm": SGEMM_IMPL}
    make_renamed_copy(source, wheel_copy, patchelf, renames, probe_names=[SGEMM_IMPL, "scipy_cblas_sgemv"])
    # beside the copy (its rpath, $ORIGIN, finds it there), under a name of its own: concurrent starts may build
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".partial")
    os.close(fd)
    staged = Path(name)
    try:
        with tempfile.TemporaryDirectory() as work:
            c_file = Path(work) / "forward.c"
            c_file.write_text(SOURCE.read_text())
            for i, flags in enumerate(flag_sets):
                try:
                    subprocess.run([compiler, *flags, *_defines(), str(c_file), "-o", str(staged), str(wheel_copy),
                                    "-Wl,-rpath,$ORIGIN"], check=True, capture_output=True, timeout=120)
                    break
                except subprocess.CalledProcessError:
                    if i == len(flag_sets) - 1:
                        raise
                    log.info("the compiler refused %s; building the BLAS forwarding without", flags)
        probe = (f"import ctypes; lib = ctypes.CDLL({str(staged)!r}, mode=ctypes.RTLD_GLOBAL); "
                 f"[getattr(lib, n) for n in {RENAMED!r}]")
        subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, timeout=120)
        os.replace(staged, target)
    except BaseException:
        wheel_copy.unlink(missing_ok=True)  # a failed build keeps nothing but its .failed note
        raise
    finally:
        staged.unlink(missing_ok=True)
    return target
