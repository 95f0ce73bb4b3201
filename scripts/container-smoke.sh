#!/usr/bin/env bash
# Builds Dockerfile.macos with Debian's buildah (no Docker engine needed), starts the image and asks
# the server inside for a generation. Root only; uses a debootstrapped Debian base (see
# ../shared/design/CONTAINERS.md). On a Mac the same image builds with `docker build`.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v buildah >/dev/null || (apt-get update -qq && apt-get install -y -qq buildah debootstrap >/dev/null)
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
if ! buildah images -q localhost/debian-base:bookworm >/dev/null 2>&1 || [ -z "$(buildah images -q localhost/debian-base:bookworm 2>/dev/null)" ]; then
  rm -rf /tmp/rootfs && debootstrap --variant=minbase bookworm /tmp/rootfs >/dev/null
  ctr=$(buildah from scratch); mnt=$(buildah mount "$ctr")
  tar -C /tmp/rootfs -c . | tar -C "$mnt" -x
  buildah umount "$ctr" >/dev/null; buildah commit -q "$ctr" localhost/debian-base:bookworm >/dev/null; buildah rm "$ctr" >/dev/null
fi
# this machine's package proxy needs the host's CA bundle inside the build (a Mac build needs neither volume)
printf '[global]\ncert = /etc/host-ca.crt\n' > /tmp/pip-build.conf
buildah bud -q --volume /etc/ssl/certs/ca-certificates.crt:/etc/host-ca.crt:ro \
  --volume /tmp/pip-build.conf:/etc/pip.conf:ro \
  --build-arg BASE=localhost/debian-base:bookworm -f Dockerfile.macos -t dtype-serve:test .
c=$(buildah from localhost/dtype-serve:test)
port=18765
buildah run --env DTYPE_SERVE_PORT=$port --env DTYPE_SERVE_HOST=127.0.0.1 "$c" -- make serve >/tmp/container-serve.log 2>&1 &
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$port/health/ready" >/dev/null && break; sleep 1
done
curl -sf "http://127.0.0.1:$port/generate" -H 'content-type: application/json' -d '{"prompt": "17+25=", "max_tokens": 8}'
echo
curl -sf "http://127.0.0.1:$port/memory" | python3 -c "import json,sys; d=json.load(sys.stdin)['device']; print(d['backend'], d['blas']['library'])"
pkill -f "dtype-serve" || true
buildah rm "$c" >/dev/null
