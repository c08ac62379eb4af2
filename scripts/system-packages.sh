#!/usr/bin/env bash
# Installs the Debian packages layerlb's tests and demo use: the real tools the renders are checked with
# (haproxy, nft), network namespaces (iproute2), certificates (openssl), the Argo CD health check (lua5.4),
# the local cluster's real nodes (containerd, runc, the CNI plugins, iptables and conntrack for kube-proxy and
# CNI, socat for the API relays) and the images they run, built without Docker (debootstrap, umoci, skopeo,
# gcc and libc6-dev for the static pause binary), the tools the speaker's tests check ARP/NDP with (arping,
# ndisc6, ping), and the routing daemons of the BGP lab: bird2 (what the speaker drives) and frr (the
# independent router of tests/kernel/bgp_lab.py). The tests run their own instances in network namespaces;
# the Debian packages would start and enable host-wide bird.service and frr.service, so their start is
# refused during the install (a temporary policy-rc.d, as in container builds) and, where systemd runs, the
# two units are disabled: a development machine must not speak BGP on its own network.
# Idempotent; quiet when all present.
set -euo pipefail

packages=(haproxy nftables iproute2 openssl ca-certificates curl make ipvsadm qemu-system-x86 busybox-static kmod lua5.4
  containerd runc containernetworking-plugins iptables conntrack socat umoci skopeo debootstrap gcc libc6-dev util-linux
  arping ndisc6 iputils-ping bird2 frr nginx-light)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
# nginx (beside haproxy): the HTTP/1 strictness table's reference (tests/dataplane/test_http1_strictness.py);
# any of the packages that provide /usr/sbin/nginx will do.
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
  missing=("${missing[@]/nginx-light/}")
fi
read -r -a missing <<<"${missing[*]:-}"
[ ${#missing[@]} -eq 0 ] && exit 0

echo "[setup] installing Debian packages: ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
# Refuse service starts while installing (invoke-rc.d and deb-systemd-invoke ask policy-rc.d), unless the
# machine has its own policy already.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
  $sudo chmod 755 /usr/sbin/policy-rc.d
  trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
fi
if ! $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >/tmp/layerlb-apt.log 2>&1; then
  $sudo apt-get update -q >>/tmp/layerlb-apt.log 2>&1
  $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >>/tmp/layerlb-apt.log 2>&1 \
    || { cat /tmp/layerlb-apt.log; exit 1; }
fi
# Leave no routing daemon, nor the tests' nginx (port 80), to start at boot (only where systemd manages services).
if [ -d /run/systemd/system ]; then
  for unit in bird.service frr.service nginx.service; do
    $sudo systemctl disable --now "$unit" >/dev/null 2>&1 || true
  done
fi
