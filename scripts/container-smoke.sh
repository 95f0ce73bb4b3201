#!/usr/bin/env bash
# Builds Dockerfile.macos with Debian's buildah (no Docker engine needed), starts the image and asks the
# server inside for a generation and for /memory; exits non-zero if any step fails. Root only; uses a
# debootstrapped Debian base, kept in buildah's storage for the next run (../shared/design/CONTAINERS.md).
# On a Mac the same image builds with `docker build`. It stops only the processes it started.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-18765}
apt_install() {  # another apt (an unattended upgrade) may hold the lock for a while
  for _ in $(seq 1 30); do
    apt-get update -qq && apt-get install -y -qq "$@" >/dev/null && return 0
    sleep 10
  done
  return 1
}
command -v buildah >/dev/null && command -v debootstrap >/dev/null || apt_install buildah debootstrap
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
if [ -z "$(buildah images -q localhost/debian-base:bookworm 2>/dev/null)" ]; then
  rootfs=$(mktemp -d)
  debootstrap --variant=minbase bookworm "$rootfs" >/dev/null
  ctr=$(buildah from scratch); mnt=$(buildah mount "$ctr")
  tar -C "$rootfs" -c . | tar -C "$mnt" -x
  buildah umount "$ctr" >/dev/null; buildah commit -q "$ctr" localhost/debian-base:bookworm >/dev/null
  buildah rm "$ctr" >/dev/null; rm -rf "$rootfs"
fi
# this machine's package proxy needs the host's CA bundle inside the build (a Mac build needs neither volume)
pipconf=$(mktemp)
printf '[global]\ncert = /etc/host-ca.crt\n' > "$pipconf"
buildah bud -q --volume /etc/ssl/certs/ca-certificates.crt:/etc/host-ca.crt:ro \
  --volume "$pipconf:/etc/pip.conf:ro" \
  --build-arg BASE=localhost/debian-base:bookworm -f Dockerfile.macos -t dtype-serve:test .
rm -f "$pipconf"

c=$(buildah from localhost/dtype-serve:test)
log=$(mktemp)
# chroot isolation: the server runs as a host process under buildah and listens on the host's loopback
buildah run --env DTYPE_SERVE_PORT="$PORT" --env DTYPE_SERVE_HOST=127.0.0.1 "$c" -- make serve >"$log" 2>&1 &
server=$!
descendants() { local child; for child in $(ps -o pid= --ppid "$1"); do descendants "$child"; echo "$child"; done; }
cleanup() {
  kill $(descendants "$server") "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  buildah rm "$c" >/dev/null 2>&1 || true
}
trap cleanup EXIT
ready=
for _ in $(seq 1 180); do
  if curl -sf "http://127.0.0.1:$PORT/health/ready" >/dev/null; then ready=1; break; fi
  kill -0 "$server" 2>/dev/null || break
  sleep 1
done
[ -n "$ready" ] || { echo "container-smoke: the server in the image did not become ready:"; tail -30 "$log"; exit 1; }
answer=$(curl -sf "http://127.0.0.1:$PORT/generate" -H 'content-type: application/json' \
  -d '{"prompt": "17+25=", "max_tokens": 8}')
echo "generate: $answer"
python3 -c "import json,sys; a=json.loads(sys.argv[1]); assert a['text'] == '42', a" "$answer"
curl -sf "http://127.0.0.1:$PORT/memory" | python3 -c "
import json, sys
m = json.load(sys.stdin)
d = m['device']
assert m['variants'] and m['variants'][0]['total_bytes'] > 0, m
assert d['allocator']['library'].startswith('libtcmalloc'), d['allocator']  # the image installs it
print('memory:', d['backend'], d['blas']['vendor'], d['allocator']['library'], m['variants'][0]['model'],
      m['variants'][0]['dtype'], m['variants'][0]['total_bytes'], 'bytes')"
echo "container-smoke: ok"
