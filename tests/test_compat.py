"""mlx-lm imports where the open-files hard limit is low (it raises it to 4096 at import)."""

import subprocess
import sys

from tests.conftest import ROOT

CODE = """
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
from models.compat import import_mlx_lm
import_mlx_lm()
import mlx_lm
print(resource.getrlimit(resource.RLIMIT_NOFILE))
"""


def test_mlx_lm_imports_under_a_low_hard_limit():
    out = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.strip() == "(1024, 1024)"
