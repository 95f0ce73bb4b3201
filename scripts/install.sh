#!/bin/sh
# Creates the virtual environment in $VENV (default .venv) and installs dtype-serve into it.
# Used by `make serve`, `make test` and Dockerfile.macos alike. EXTRAS=test adds the test tools;
# CUDA=1 installs MLX's CUDA 13 backend instead of the CPU one on Linux.
set -eu
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-}
# An optimized BLAS makes float32 on Linux CPUs 10-50x faster (models/platform/blas.py loads it).
if [ "$(uname -s)" = Linux ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
   && ! ldconfig -p 2>/dev/null | grep -q libopenblas; then
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends libopenblas0-pthread) >/dev/null 2>&1 \
    || echo "note: could not install libopenblas0-pthread; float32 stays on the reference BLAS"
fi
# A C compiler builds, once, the BLAS forwarding and the CPU's quantized kernel (models/platform/blas_forward.py).
if [ "$(uname -s)" = Linux ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
   && ! command -v cc >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc libc6-dev) >/dev/null 2>&1 \
    || echo "note: could not install gcc; quantized layers on the CPU take the slower unpack path"
fi
# A thread-caching malloc the server preloads: MLX's CPU graph nodes cost less on it (models/platform/allocator.py).
if [ "$(uname -s)" = Linux ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
   && ! ldconfig -p 2>/dev/null | grep -qE 'libtcmalloc(_minimal)?\.so\.4|libjemalloc\.so\.2'; then
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4) >/dev/null 2>&1 \
    || echo "note: could not install libtcmalloc-minimal4; the server runs on glibc's malloc"
fi
# The console's browser test (tests/test_console.py) drives Debian's Chromium through Playwright.
case ",$EXTRAS," in *,test,*)
  if [ "$(uname -s)" = Linux ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
     && ! [ -x /usr/bin/chromium ]; then
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium) >/dev/null 2>&1 \
      || echo "note: could not install chromium; tests/test_console.py will fail until it is installed"
  fi ;;
esac
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
if [ "${CUDA:-0}" = 1 ]; then
  EXTRAS=${EXTRAS:+$EXTRAS,}cuda
fi
# lm-eval (a test tool) needs torch: on Linux the CPU wheel (~200 MB) instead of the CUDA one PyPI gives (GBs)
case ",$EXTRAS," in *,test,*)
  if [ "$(uname -s)" = Linux ] && ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    # one retry: where that index is unreachable, each of torch's dependencies would wait out pip's five
    "$VENV/bin/python" -m pip install -q --retries 1 torch --index-url https://download.pytorch.org/whl/cpu \
      || echo "note: the CPU torch index is unreachable; pip installs the torch that PyPI gives"
  fi ;;
esac
"$VENV/bin/python" -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
# The OpenBLAS wheel's copy renamed for MLX, made now rather than at the first start (an image stays read-only)
"$VENV/bin/python" -c "from models.platform.openblas_wheel import bridged_library; bridged_library()" || true
if [ "${CUDA:-0}" = 1 ]; then
  # mlx-cpu and mlx-cuda-13 ship the same library file: keep only the CUDA one
  "$VENV/bin/python" -m pip uninstall -q -y mlx-cpu
  "$VENV/bin/python" -m pip install -q --force-reinstall --no-deps "mlx-cuda-13==0.32.4"
fi
