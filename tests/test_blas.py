"""float32 matmuls under the BLAS chosen at startup agree with numpy."""

import sys

import mlx.core as mx
import numpy as np
import pytest

from models.blas import _find_optimized, blas_info


def test_the_optimized_blas_on_this_machine_is_in_use():
    info = blas_info()
    if sys.platform == "darwin":
        assert info.library == "accelerate"
    elif _find_optimized() is not None:  # scripts/install.sh installs OpenBLAS where it can
        assert info.library == _find_optimized() and info.vendor in ("openblas", "mkl")
        assert info.threads and info.threads >= 1
    else:
        assert info.library == "reference" and "no optimized BLAS" in info.note


@pytest.mark.parametrize("m,k,n", [(1, 4096, 4096), (64, 1024, 2048), (7, 333, 129)])
def test_float32_matmul_matches_numpy(m, k, n):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    got = np.array(mx.array(a) @ mx.array(b))
    np.testing.assert_allclose(got, a @ b, rtol=1e-4, atol=1e-3)


def test_float32_matvec_matches_numpy():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((2048, 1024), dtype=np.float32)
    x = rng.standard_normal((1024,), dtype=np.float32)
    np.testing.assert_allclose(np.array(mx.array(w) @ mx.array(x)), w @ x, rtol=1e-4, atol=1e-3)
