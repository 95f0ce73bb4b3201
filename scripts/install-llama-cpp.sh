#!/bin/sh
# Builds llama.cpp's llama-server and llama-quantize, a peer for bench/serving.py (--peers llama_cpp), into
# $PREFIX (default bench/.llama-cpp). The source is the llama.cpp vendored in llama-cpp-python's source
# distribution on the package index (its wheel ships no programs). Idempotent; needs cmake and a C++ compiler.
set -eu
cd "$(dirname "$0")/.."
PREFIX=${PREFIX:-bench/.llama-cpp}
PYTHON=${PYTHON:-python3}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
STAMP="$PREFIX/.installed-$VERSION"
fail() { echo "install-llama-cpp: $*" >&2; exit 1; }
[ -f "$STAMP" ] && { echo "llama.cpp (llama-cpp-python $VERSION) already built in $PREFIX"; exit 0; }
command -v cmake >/dev/null || fail "cmake is missing"
mkdir -p "$PREFIX/src"
# the sdist itself, found through the index's JSON API (pip download would build its metadata: a cmake run)
INDEX=${PIP_INDEX_URL:-https://pypi.org/simple}
"$PYTHON" - "$INDEX" "$VERSION" "$PREFIX/src" <<'PY' || fail "could not download llama-cpp-python==$VERSION's source"
import json, sys, urllib.request
index, version, folder = sys.argv[1:]
request = urllib.request.Request(f"{index.rstrip('/')}/llama-cpp-python/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
files = json.load(urllib.request.urlopen(request, timeout=60))["files"]
sdist = next(f for f in files if f["filename"] == f"llama_cpp_python-{version}.tar.gz")
urllib.request.urlretrieve(sdist["url"], f"{folder}/{sdist['filename']}")
PY
tar -xzf "$PREFIX/src/llama_cpp_python-$VERSION.tar.gz" -C "$PREFIX/src"
src="$PREFIX/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
[ -f "$src/CMakeLists.txt" ] || fail "no vendored llama.cpp in the source distribution"
cmake -S "$src" -B "$PREFIX/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null || fail "cmake could not configure llama.cpp"
cmake --build "$PREFIX/build" --target llama-server llama-quantize -j"$(nproc)" >/dev/null \
  || fail "llama.cpp did not build"
"$PREFIX/build/bin/llama-server" --version >/dev/null 2>&1 || fail "llama-server was built but does not run"
touch "$STAMP"
echo "llama.cpp built: $PREFIX/build/bin/llama-server, $PREFIX/build/bin/llama-quantize"
