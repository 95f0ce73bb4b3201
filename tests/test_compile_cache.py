"""MLX's CPU kernel cache poisoned by a process stopped mid-compile (models.platform.compile_cache): libraries cut
off halfway are found and removed, the fused path and the server recover, and a compile that a signal
to the process group reaches still completes or leaves nothing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlx.core as mx
import pytest

import models.platform.compile_cache as compile_cache
from models.platform.compile_cache import instruction_set, is_complete_library, kernel_folders, sweep
from tests.conftest import ROOT, start_server, stop_server

pytestmark = pytest.mark.skipif(mx.default_device().type != mx.cpu or shutil.which("g++") is None,
                                reason="MLX compiles CPU kernels with g++ only where it computes on the CPU")

PROBE = """
import sys
import models
from models.platform.compile_cache import kernel_folders, use_private_compile_cache
from models.decode.cpu_fusion import compiles_on_cpu, fused_kernels_state
if sys.argv[1] == "poison-after-start":  # cut off by another process after this one's start-up sweep
    for library in kernel_folders(use_private_compile_cache())[0].glob("*.so"):
        library.write_bytes(library.read_bytes()[:100])
print(compiles_on_cpu(), fused_kernels_state())
"""


def probe(cache: Path, mode: str = "plain") -> subprocess.CompletedProcess:
    env = {**os.environ, "DTYPE_SERVE_CACHE": str(cache)}
    env.pop(compile_cache.ENV, None)
    return subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def kernels_root(cache: Path) -> Path:
    """Where MLX compiles under a DTYPE_SERVE_CACHE: a folder per instruction set."""
    return cache / "mlx-compile" / instruction_set()[0]


def libraries(root: Path) -> list[Path]:
    return sorted(p for folder in kernel_folders(root) for p in folder.glob("*.so"))


def poison(root: Path) -> None:
    """What a stop mid-compile leaves: empty and half-written libraries."""
    for i, library in enumerate(libraries(root)):
        data = library.read_bytes()
        library.write_bytes(b"" if i % 2 else data[: len(data) // 2])


@pytest.fixture(scope="module")
def populated(tmp_path_factory) -> Path:
    """A cache that the fused probe has filled with complete libraries."""
    cache = tmp_path_factory.mktemp("cache")
    result = probe(cache)
    assert result.stdout.split() == ["True", "fused"], result.stderr
    assert libraries(kernels_root(cache))
    return cache


def test_complete_libraries_pass_and_cut_off_ones_fail(populated, tmp_path):
    library = libraries(kernels_root(populated))[0]
    assert is_complete_library(library)
    data = library.read_bytes()
    for length in (0, 3, 64, len(data) // 2, len(data) - 1):
        cut = tmp_path / f"lib{length}.so"
        cut.write_bytes(data[:length])
        assert not is_complete_library(cut), length
    text = tmp_path / "text.so"
    text.write_text("not a library" * 10)
    assert not is_complete_library(text)


def test_sweep_removes_only_cut_off_libraries(populated, tmp_path):
    folder = tmp_path / "mlx" / "0.0.1" / "cpu"
    folder.mkdir(parents=True)
    whole = libraries(kernels_root(populated))[:3]
    for library in whole:
        shutil.copy(library, folder / library.name)
    (folder / "libempty.so").write_bytes(b"")
    (folder / "libhalf.so").write_bytes(whole[0].read_bytes()[:500])
    removed = sweep(tmp_path)
    assert sorted(p.name for p in removed) == ["libempty.so", "libhalf.so"]
    assert sorted(p.name for p in folder.glob("*.so")) == sorted(p.name for p in whole)


def test_a_cache_poisoned_before_start_is_swept_and_decodes_fused(populated, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(populated, cache)
    poison(kernels_root(cache))
    result = probe(cache)
    assert result.stdout.split() == ["True", "fused"], result.stderr
    assert "truncated MLX kernel libraries" in result.stderr
    assert all(is_complete_library(p) for p in libraries(kernels_root(cache)))


def test_a_library_poisoned_after_start_is_removed_and_built_again(populated, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(populated, cache)
    result = probe(cache, "poison-after-start")
    assert result.stdout.split() == ["True", "fused"], result.stderr
    assert "failed to load" in result.stderr
    assert all(is_complete_library(p) for p in libraries(kernels_root(cache)))


def test_a_compile_signalled_through_its_process_group_still_completes(tmp_path):
    wrapper = compile_cache.install_atomic_compiler(tmp_path / "bin")
    source = tmp_path / "kernel.cpp"
    # enough code that the compile is still running when the signal comes
    source.write_text("#include <map>\n#include <string>\n#include <vector>\n" + "".join(
        f'extern "C" int f{i}() {{ std::map<std::string, std::vector<int>> m; m["{i}"].push_back({i}); '
        f'return (int)m.size(); }}\n' for i in range(60)))
    target = tmp_path / "libkernel.so"
    started = time.monotonic()
    compile_ = subprocess.Popen([str(wrapper), "-std=c++17", "-O3", "-fPIC", "-shared", str(source), "-o", str(target)],
                                start_new_session=True)
    time.sleep(0.3)
    os.killpg(compile_.pid, signal.SIGTERM)  # what Ctrl-C or a stopped service sends to the whole group
    assert compile_.wait(timeout=120) == 0
    assert time.monotonic() - started > 0.3  # the signal came while it compiled
    assert is_complete_library(target)
    assert not list(tmp_path.glob("*.part.*"))


def test_a_failed_compile_leaves_no_library(tmp_path):
    wrapper = compile_cache.install_atomic_compiler(tmp_path / "bin")
    (tmp_path / "bad.cpp").write_text("this is not C++\n")
    run = subprocess.run([str(wrapper), "-shared", "-fPIC", str(tmp_path / "bad.cpp"), "-o", str(tmp_path / "lib.so")],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "error" in run.stderr
    assert list(tmp_path.glob("*.so*")) == []


def test_the_server_recovers_from_poisoned_caches_of_its_own_and_of_the_system(populated, tmp_path):
    cache, system_temp = tmp_path / "cache", tmp_path / "tmp"
    shutil.copytree(populated, cache)
    shutil.copytree(kernels_root(populated) / "mlx", system_temp / "mlx")  # as MLX left it in /tmp
    poison(kernels_root(cache))
    poison(system_temp)
    env = {"DTYPE_SERVE_CACHE": str(cache), "TMPDIR": str(system_temp),
           "PATH": os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if "mlx-compile" not in p)}
    proc, base = start_server("--dtype", "float32", "--no-warmup", env=env)  # the request builds its kernels
    try:
        assert httpx.get(f"{base}/memory", timeout=10).json()["device"]["cpu_kernels"] == "fused"
        answer = httpx.post(f"{base}/generate", json={"prompt": "17+25=", "max_tokens": 8}, timeout=60).json()
        assert answer["text"] == "42"
    finally:
        stop_server(proc)
    assert all(is_complete_library(p) for p in libraries(kernels_root(cache)))


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/cpuinfo")
def test_kernels_are_built_for_avx2_and_fma_where_the_cpu_has_them_without_fused_roundings(tmp_path):
    tag, flags = instruction_set()
    has = {"avx2", "fma"} <= _cpu_flags() and os.uname().machine == "x86_64"
    assert tag.startswith("x86-64-avx2-fma-") == has and (tag == "baseline") == (not has)
    wrapper = compile_cache.install_atomic_compiler(tmp_path / "bin", flags)
    # what the wrapper's compiler defines: FMA where the CPU has it, and never a contraction MLX's own ops lack
    macros = subprocess.run([str(wrapper), "-dM", "-E", "-x", "c++", "/dev/null"], capture_output=True, text=True,
                            check=True).stdout
    assert ("#define __FMA__ 1" in macros) == has and ("#define __AVX2__ 1" in macros) == has
    if has:
        assert "-ffp-contract=off" in flags.split()


def test_each_instruction_set_has_a_kernel_folder_and_compiler_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(compile_cache, "_folder", None)
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "kernels"))
    monkeypatch.setenv("TMPDIR", os.environ.get("TMPDIR", "/tmp"))
    monkeypatch.setenv("PATH", os.environ["PATH"])
    monkeypatch.setattr(compile_cache, "instruction_set", lambda: ("baseline", ""))
    baseline = compile_cache.use_private_compile_cache()
    monkeypatch.setattr(compile_cache, "_folder", None)
    monkeypatch.setattr(compile_cache, "instruction_set", lambda: ("x86-64-avx2-fma", "-mavx2 -mfma"))
    wide = compile_cache.use_private_compile_cache()
    assert baseline == tmp_path / "kernels" / "baseline" and wide == tmp_path / "kernels" / "x86-64-avx2-fma"
    assert "-mfma" not in (baseline / "bin" / "g++").read_text() and "-mfma" in (wide / "bin" / "g++").read_text()
    assert os.environ["TMPDIR"] == str(wide)
