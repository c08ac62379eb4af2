#!/usr/bin/env bash
# Installs the Debian packages layerlb's tests and demo use: the real tools the renders are checked with
# (haproxy, nft), network namespaces (iproute2), certificates (openssl), the Argo CD health check (lua5.4),
# the local cluster's real nodes (containerd, runc, the CNI plugins, iptables and conntrack for kube-proxy and
# CNI, socat for the API relays) and the images they run, built without Docker (debootstrap, umoci, skopeo,
# gcc and libc6-dev for the static pause binary), and the tools the speaker's tests check ARP/NDP with (arping,
# ndisc6, ping).
# Idempotent; quiet when all present.
set -euo pipefail

packages=(haproxy nftables iproute2 openssl ca-certificates curl make ipvsadm qemu-system-x86 busybox-static kmod lua5.4
  containerd runc containernetworking-plugins iptables conntrack socat umoci skopeo debootstrap gcc libc6-dev util-linux
  arping ndisc6 iputils-ping)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "[setup] installing Debian packages: ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
if ! $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >/tmp/layerlb-apt.log 2>&1; then
  $sudo apt-get update -q >>/tmp/layerlb-apt.log 2>&1
  $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >>/tmp/layerlb-apt.log 2>&1 \
    || { cat /tmp/layerlb-apt.log; exit 1; }
fi
