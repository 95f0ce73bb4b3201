#!/bin/sh
# Installs vllm-mlx, a peer for bench/serving.py (--peers vllm_mlx), in its own virtual environment
# $VENV (default bench/.venv-vllm-mlx): it pins an older mlx-lm than dtype-serve uses. Idempotent.
# vllm-mlx targets Apple silicon; on Linux it runs on MLX's CPU build (mlx[cpu]). Its hard requirement
# torchvision (which pulls torch and several GB of CUDA wheels) serves only its vision and vLLM-plugin
# code, never `vllm-mlx serve` of a text model, so it is left out: vllm-mlx goes in with --no-deps and
# every other requirement it declares after it.
set -eu
cd "$(dirname "$0")/.."
VENV=${VENV:-bench/.venv-vllm-mlx}
PYTHON=${PYTHON:-python3}
VERSION=${VLLM_MLX_VERSION:-0.6.0}
STAMP="$VENV/.installed-vllm-mlx-$VERSION"
fail() { echo "install-vllm-mlx: $*" >&2; exit 1; }
[ -f "$STAMP" ] && { echo "vllm-mlx $VERSION already installed in $VENV"; exit 0; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV" || fail "could not create the venv $VENV with $PYTHON"
PY="$VENV/bin/python"
MLX=mlx
[ "$(uname -s)" = Linux ] && MLX="mlx[cpu]"
"$PY" -m pip install -q --upgrade pip || fail "could not upgrade pip in $VENV"
"$PY" -m pip install -q --no-deps "vllm-mlx==$VERSION" || fail "pip could not install vllm-mlx==$VERSION"
"$PY" -c "from importlib.metadata import requires
print('\n'.join(r for r in requires('vllm-mlx') if 'extra ==' not in r and not r.startswith('torchvision')))" \
  > "$VENV/requirements-vllm-mlx.txt" || fail "could not read vllm-mlx's requirements"
echo "installing $MLX and vllm-mlx's requirements but torchvision (pip will note that it is missing)"
"$PY" -m pip install -q "$MLX" -r "$VENV/requirements-vllm-mlx.txt" \
  || fail "pip could not install $MLX and vllm-mlx's requirements (see $VENV/requirements-vllm-mlx.txt)"
"$VENV/bin/vllm-mlx" serve --help >/dev/null 2>&1 \
  || fail "vllm-mlx is installed but does not start; run $VENV/bin/vllm-mlx serve --help to see why"
touch "$STAMP"
echo "vllm-mlx $VERSION installed: $VENV/bin/vllm-mlx"
