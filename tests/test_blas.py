"""float32 matmuls under the BLAS chosen at startup agree with numpy."""

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from models.platform.blas import _find_optimized, blas_info


def test_the_optimized_blas_on_this_machine_is_in_use():
    info = blas_info()
    if sys.platform == "darwin":
        assert info.library == "accelerate"
    elif _find_optimized() is not None:  # the scipy-openblas32 wheel, or a system OpenBLAS
        assert info.library == _find_optimized() and info.vendor in ("openblas", "mkl")
        assert info.threads and info.threads >= 1
    else:
        assert info.library == "reference" and "no optimized BLAS" in info.note


@pytest.mark.skipif(sys.platform == "darwin" or _find_optimized() is None, reason="OpenBLAS is loaded on Linux only")
@pytest.mark.parametrize("given,expected", [(None, "18"), ("24", "24")])
def test_openblas_threads_stop_spinning_soon_after_a_product_unless_the_operator_says(given, expected):
    # OpenBLAS reads it once, when it is loaded: configure_blas sets it before (a process of its own)
    probe = ("import os; from models.platform.blas import configure_blas; configure_blas(); "
             "print(os.environ['OPENBLAS_THREAD_TIMEOUT'])")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if given:
        env["OPENBLAS_THREAD_TIMEOUT"] = given
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, env=env).stdout
    assert out.strip() == expected


@pytest.mark.skipif(sys.platform == "darwin" or _find_optimized() is None, reason="OpenBLAS is loaded on Linux only")
@pytest.mark.parametrize("threads", [1, 2])
def test_a_thread_count_given_is_the_one_the_products_use(threads):
    # the forwarding library's products share their columns among openblas_get_num_threads() threads
    probe = ("import ctypes; from models.platform.blas import configure_blas; "
             f"info = configure_blas('auto', {threads}); "
             "print(info.threads, ctypes.CDLL(info.library).openblas_get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, env=env).stdout
    assert out.split() == [str(threads), str(threads)]


@pytest.mark.parametrize("m,k,n", [(1, 4096, 4096), (64, 1024, 2048), (7, 333, 129)])
def test_float32_matmul_matches_numpy(m, k, n):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    got = np.array(mx.array(a) @ mx.array(b))
    np.testing.assert_allclose(got, a @ b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 16, 17])
@pytest.mark.parametrize("layout", ["a @ b", "a @ bt.T", "at.T @ b", "at.T @ bt.T"])
def test_few_row_products_match_numpy_in_every_layout(rows, layout):
    # under the forwarding library (models/platform/blas_forward.py) "@ bt.T" up to FEW_ROWS rows is its own
    # product (blocks of 8 rows, k = 300 not a whole number of vectors); one or two rows otherwise take sgemv
    rng = np.random.default_rng(rows)
    a = rng.standard_normal((rows, 300), dtype=np.float32)
    b = rng.standard_normal((300, 1003), dtype=np.float32)  # an odd width: columns past whole groups of 4
    arrays = {"a": mx.array(a), "b": mx.array(b), "at": mx.array(np.ascontiguousarray(a.T)),
              "bt": mx.array(np.ascontiguousarray(b.T))}
    got = np.array(eval(layout, {}, arrays))
    np.testing.assert_allclose(got, a @ b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("rows,positions,width", [(1, 1024, 64), (4, 2500, 128), (8, 4096, 64), (3, 1100, 256)])
def test_attention_value_products_match_float64_sums(rows, positions, width):
    # (rows, positions) @ (positions, width), B untransposed: under the forwarding library from 256 KB the positions
    # are cut into chunks the threads share (a last chunk partial here), their partial sums added in order
    rng = np.random.default_rng(positions)
    a = rng.standard_normal((rows, positions), dtype=np.float32)
    b = rng.standard_normal((positions, width), dtype=np.float32)
    got = np.array(mx.array(a) @ mx.array(b))
    np.testing.assert_allclose(got, a.astype(np.float64) @ b.astype(np.float64), rtol=1e-4, atol=1e-3)
    batched = np.array(mx.array(np.stack([a, 2 * a])) @ mx.array(np.stack([b, b])))  # per head, as attention calls
    np.testing.assert_allclose(batched[1], 2 * got, rtol=1e-6, atol=1e-5)


def test_one_token_attention_over_a_long_context_matches_float64():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 8, 1, 64), dtype=np.float32)
    k, v = (rng.standard_normal((1, 8, 3000, 64), dtype=np.float32) for _ in range(2))
    got = np.array(mx.fast.scaled_dot_product_attention(mx.array(q), mx.array(k), mx.array(v), scale=0.125))
    scores = (q.astype(np.float64) * 0.125) @ k.astype(np.float64).swapaxes(-1, -2)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    expected = (weights / weights.sum(-1, keepdims=True)) @ v.astype(np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2])
def test_few_row_products_with_an_addend_scale_both_terms(rows):
    # MLX's addmm hands BLAS alpha, beta and an output holding the addend: sgemv must honour all three
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((rows, 200), dtype=np.float32), rng.standard_normal((200, 300), dtype=np.float32)
    c = rng.standard_normal((rows, 300), dtype=np.float32)
    got = np.array(mx.addmm(mx.array(c), mx.array(a), mx.array(b), alpha=0.5, beta=2.0))
    np.testing.assert_allclose(got, 0.5 * (a @ b) + 2.0 * c, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("weight", ["(k, n)", "(n, k) transposed"])
@pytest.mark.parametrize("rows", [1, 5])
def test_a_few_row_product_never_reads_its_output_memory(weight, rows):
    # MLX hands BLAS uninitialized (recycled) memory with beta 0: NaNs left there must not leak into the result
    b = mx.ones((512, 4096)) if weight == "(k, n)" else mx.ones((4096, 512)).T
    mx.eval(b)
    for _ in range(3):
        junk = mx.full((rows, 4096), float("nan"))
        mx.eval(junk)
        del junk
        out = mx.ones((rows, 512)) @ b
        assert mx.all(out == 512).item()


def test_float32_matvec_matches_numpy():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((2048, 1024), dtype=np.float32)
    x = rng.standard_normal((1024,), dtype=np.float32)
    np.testing.assert_allclose(np.array(mx.array(w) @ mx.array(x)), w @ x, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the wheel's OpenBLAS serves Linux only")
def test_the_openblas_wheel_is_renamed_once_into_the_cache(tmp_path, monkeypatch):
    from models.platform import openblas_wheel

    monkeypatch.setenv("DTYPE_SERVE_CACHE", str(tmp_path))
    path = openblas_wheel.bridged_library()
    assert path is not None and path.startswith(str(tmp_path))
    probe = ("import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); lib.cblas_sgemm; lib.openblas_set_num_threads;"
             "lib.openblas_get_config.restype = ctypes.c_char_p; print(lib.openblas_get_config().decode())")
    config = subprocess.run([sys.executable, "-c", probe, path], check=True, capture_output=True, text=True).stdout
    assert config.startswith("OpenBLAS")
    made = os.stat(path).st_mtime_ns
    assert openblas_wheel.bridged_library() == path and os.stat(path).st_mtime_ns == made
    assert [p.name for p in tmp_path.rglob("*")] == ["blas", os.path.basename(path)]  # no leftovers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the wheel's OpenBLAS serves Linux only")
def test_without_patchelf_the_wheel_is_left_alone(tmp_path, monkeypatch):
    from models.platform import openblas_wheel

    monkeypatch.setenv("DTYPE_SERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(openblas_wheel, "patchelf_path", lambda: None)
    assert openblas_wheel.bridged_library() is None
    assert not (tmp_path / "blas").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the wheel's OpenBLAS serves Linux only")
def test_a_failed_rename_leaves_no_partial_file(tmp_path, monkeypatch):
    from models.platform import openblas_wheel

    monkeypatch.setenv("DTYPE_SERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(openblas_wheel, "patchelf_path", lambda: "false")  # a command that fails
    assert openblas_wheel.bridged_library() is None
    assert [p.suffix for p in (tmp_path / "blas").iterdir()] == [".failed"]  # the failure, no partial copy


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the wheel's OpenBLAS serves Linux only")
def test_a_failed_rename_is_not_retried_until_patchelf_changes(tmp_path, monkeypatch):
    from models.platform import openblas_wheel

    monkeypatch.setenv("DTYPE_SERVE_CACHE", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    tool = tmp_path / "patchelf"
    tool.write_text(f"#!/bin/sh\necho run >> {runs}\nexit 1\n")
    tool.chmod(0o755)
    monkeypatch.setattr(openblas_wheel, "patchelf_path", lambda: str(tool))
    assert openblas_wheel.bridged_library() is None
    assert openblas_wheel.bridged_library() is None
    assert runs.read_text().count("run") == 1  # the second start remembered the failure
    os.utime(tool, ns=(0, os.stat(tool).st_mtime_ns + 10**9))  # patchelf replaced: one more try
    assert openblas_wheel.bridged_library() is None
    assert runs.read_text().count("run") == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the wheel's OpenBLAS serves Linux only")
def test_a_copy_without_the_names_mlx_needs_is_not_kept(tmp_path, monkeypatch):
    from models.platform import openblas_wheel

    monkeypatch.setenv("DTYPE_SERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(openblas_wheel, "PREFIX", "nothing_")  # as if a wheel used another prefix
    assert openblas_wheel.bridged_library() is None
    assert [p.suffix for p in (tmp_path / "blas").iterdir()] == [".failed"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the wheel's OpenBLAS serves Linux only")
def test_the_forwarding_library_is_built_once_and_exports_what_mlx_binds(tmp_path, monkeypatch):
    from models.platform import blas_forward

    if blas_forward._compiler() is None:
        pytest.skip("no C compiler on this machine")  # the plain renamed wheel is used then (next test)
    monkeypatch.setenv("DTYPE_SERVE_CACHE", str(tmp_path))
    path = blas_forward.forwarding_library()
    assert path is not None and path.startswith(str(tmp_path))
    # in a child (this process has bound its BLAS): MLX's names resolve, and a one-row product is right
    probe = ("import ctypes, sys, numpy as np; lib = ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL);"
             "[getattr(lib, n) for n in ('cblas_sgemm', 'cblas_dgemm', 'openblas_set_num_threads')];"
             "a = np.arange(6, dtype=np.float32).reshape(1, 6); b = np.ones((6, 3), np.float32);"
             "c = np.full((1, 3), np.nan, np.float32); P = ctypes.c_void_p; F = ctypes.c_float;"
             "lib.cblas_sgemm(101, 111, 111, 1, 3, 6, F(1), a.ctypes.data_as(P), 6, b.ctypes.data_as(P), 3, F(0),"
             " c.ctypes.data_as(P), 3); print(c.tolist())")
    out = subprocess.run([sys.executable, "-c", probe, path], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[[15.0, 15.0, 15.0]]"
    made = os.stat(path).st_mtime_ns
    assert blas_forward.forwarding_library() == path and os.stat(path).st_mtime_ns == made
    assert not [p for p in (tmp_path / "blas").iterdir() if p.suffix in (".partial", ".failed")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the wheel's OpenBLAS serves Linux only")
def test_without_a_compiler_the_plain_wheel_is_used(tmp_path, monkeypatch):
    from models.platform import blas_forward

    monkeypatch.setenv("DTYPE_SERVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that fails: remembered, not retried
    assert blas_forward.forwarding_library() is None
    assert [p.suffix for p in (tmp_path / "blas").iterdir()] == [".failed"]  # no copy of the wheel left
    assert blas_forward.forwarding_library() is None

