#!/usr/bin/env bash
# Make a base image locally, for machines that reach Debian's and PyPI's mirrors but no
# container registry (so `python:3.11-slim` cannot be pulled). Debian bookworm's python3 is
# 3.11, the bentos' python_version. Needs root, debootstrap and podman (or buildah).
#
#   bentos/base-image.sh [IMAGE] [WORKDIR]
#   make images BASE_IMAGE=localhost/multimodal-base:bookworm
#
# What BentoML's generated Dockerfile needs from a base (base_v2.j2): groupadd/useradd,
# apt-get (its first RUN is always `apt-get install ... build-essential git`), a Python of
# the bento's version, and uv (else it runs `pip install uv`, and Debian's pip refuses to
# install into the system Python: PEP 668). So uv goes in here, copied from the venv.
set -euo pipefail
IMAGE=${1:-localhost/multimodal-base:bookworm}
WORK=${2:-/tmp/multimodal-base}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
UV=${UV:-$(command -v uv || echo .venv/bin/uv)}
ENGINE=${ENGINE:-$(command -v podman || command -v buildah)}

rm -rf "$WORK/rootfs"
mkdir -p "$WORK"
nice -n 10 debootstrap --variant=minbase --include=python3,ca-certificates bookworm "$WORK/rootfs" "$MIRROR"
install -m 0755 "$UV" "$WORK/rootfs/usr/local/bin/uv"
# Certificate authorities added on this host (a TLS-intercepting proxy's, say) go in too, or
# uv inside the build cannot reach PyPI through it. None on an ordinary host.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$WORK/rootfs/usr/local/share/ca-certificates/"
    chroot "$WORK/rootfs" update-ca-certificates >/dev/null
fi
rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
# uv uses its own certificate roots unless SSL_CERT_FILE names a bundle.
tar -C "$WORK/rootfs" -c . | nice -n 10 "$ENGINE" import \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$IMAGE"
rm -rf "$WORK/rootfs"
echo "$IMAGE"
