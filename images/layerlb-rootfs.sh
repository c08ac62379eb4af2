#!/bin/sh
# What goes into layerlb's image, run by both builders so they cannot drift: the Dockerfile (`docker
# build`, on debian:bookworm-slim) and e2e/images/build.py (no Docker: debootstrap, a chroot, umoci).
#
#   layerlb-rootfs.sh packages       print the Debian packages (build.py gives them to debootstrap)
#   layerlb-rootfs.sh system         install them with apt-get, then `clean` (the Dockerfile)
#   layerlb-rootfs.sh venv PIP_ARGS  create the virtual environment /opt/layerlb, `pip install PIP_ARGS`
#   layerlb-rootfs.sh clean          drop apt's lists and caches, logs, docs (but copyrights), man pages
#
# python3-venv: the venv and its pip. The kernel architectures (nat, dsr, tunnel) program IPVS and
# nftables and the transparent proxy routes with `ip`; the IPVS engine speaks netlink itself, ipvsadm
# is there for people inspecting a node (`ipvsadm -Ln`). bird2: the routing daemon the speaker drives in BGP
# mode (`bird`, `birdc`; ~1.5 MB; its service is never started in a container: there is no init).
set -eu

PACKAGES="python3 python3-venv iproute2 nftables ipvsadm ca-certificates bird2"
VENV=/opt/layerlb

case "${1:-}" in
packages)
    echo "$PACKAGES"
    ;;
system)
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    # shellcheck disable=SC2086 # one word per package
    apt-get install -y --no-install-recommends $PACKAGES
    sh "$0" clean
    ;;
venv)
    shift
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
        "$VENV/bin/pip" install --no-input "$@"
    ;;
clean)
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb \
        /var/log/apt/* /var/log/*.log /usr/share/man/* /usr/share/info/*
    find /usr/share/doc -type f ! -name copyright -delete
    ;;
*)
    echo "usage: $0 packages | system | venv PIP_ARGS... | clean" >&2
    exit 2
    ;;
esac
