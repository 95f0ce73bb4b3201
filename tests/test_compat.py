"""mlx-lm imports where the open-files hard limit is low (it raises it to 4096 at import)."""

import subprocess
import sys

from tests.conftest import ROOT

CODE = """
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
from models.platform.compat import import_mlx_lm
import_mlx_lm()
import mlx_lm
print(resource.getrlimit(resource.RLIMIT_NOFILE))
"""


def test_mlx_lm_imports_under_a_low_hard_limit():
    out = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.strip() == "(1024, 1024)"


ATTENTION = """
import os
from models.platform.compat import configure_cuda_attention
configure_cuda_attention()
print(os.environ["MLX_CUDA_USE_CUDNN_SDPA"])
"""


def test_cudnn_attention_is_off_unless_the_operator_sets_it():
    import os

    env = {k: v for k, v in os.environ.items() if k != "MLX_CUDA_USE_CUDNN_SDPA"}
    default = subprocess.run([sys.executable, "-c", ATTENTION], cwd=ROOT, capture_output=True, text=True, env=env)
    chosen = subprocess.run([sys.executable, "-c", ATTENTION], cwd=ROOT, capture_output=True, text=True,
                            env={**env, "MLX_CUDA_USE_CUDNN_SDPA": "1"})
    assert default.stdout.strip() == "0" and chosen.stdout.strip() == "1"
