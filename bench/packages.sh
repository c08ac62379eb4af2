#!/usr/bin/env bash
# Installs the Debian packages only the bench uses (nginx backends, the wrk load generator) besides the
# ones `make setup` already brings (haproxy, nftables, iproute2), so `make test` never installs bench tools.
# Idempotent; quiet when all are present.
set -euo pipefail

packages=(nginx-light wrk haproxy nftables iproute2)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
# nginx-light is one of several packages that provide /usr/sbin/nginx; any of them will do.
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
  missing=("${missing[@]/nginx-light/}")
fi
read -r -a missing <<<"${missing[*]:-}"
[ ${#missing[@]} -eq 0 ] && exit 0

echo "[bench] installing Debian packages: ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
if ! $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >/tmp/layerlb-bench-apt.log 2>&1; then
  $sudo apt-get update -q >>/tmp/layerlb-bench-apt.log 2>&1
  $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >>/tmp/layerlb-bench-apt.log 2>&1 \
    || { cat /tmp/layerlb-bench-apt.log; exit 1; }
fi
