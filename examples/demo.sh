#!/usr/bin/env bash
# layerlb's main job on this machine: the local cluster with real nodes (kubelet, containerd and kube-proxy
# in network namespaces), the project's images built without Docker, the chart installed with Helm, every
# example this kernel can run applied with kubectl and Ready, and client commands through the VIPs from
# outside the cluster. Needs root. DEMO_ONCE=1: stop after the client commands instead of serving until
# Ctrl-C. The cluster keeps running afterwards (`make cluster-down` stops it and cleans the host).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (network namespaces, containerd, kubelets)" >&2; exit 1; }
export PYTHONPATH="$PWD:$PWD/operator:$PWD/dataplane${PYTHONPATH:+:$PYTHONPATH}"
exec .venv/bin/python -m e2e.nodes.demo ${DEMO_ONCE:+--once}
