#!/usr/bin/env bash
# layerlb's main job on this machine: a real local control plane, the CRDs, the operator, every example
# applied with kubectl, its forwarding pods started by the e2e pod runner (no kubelet here) in network
# namespaces, backends behind them, and client commands that go through the VIPs. Needs root.
# DEMO_ONCE=1: stop after the client commands instead of serving until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
LAYERLB=.venv/bin/layerlb
export PYTHONPATH="$PWD:$PWD/operator:$PWD/dataplane${PYTHONPATH:+:$PYTHONPATH}"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (the pod runner makes network namespaces)" >&2; exit 1; }

say "starting the local control plane (etcd, kube-apiserver, kube-controller-manager; first run builds them)"
eval "$($PY e2e/cluster/cluster.py up)"
kubectl version 2>/dev/null | sed -n 's/^Server Version: /API server /p'

say "installing the CRDs"
kubectl apply --server-side --force-conflicts -f crds/
kubectl wait --for=condition=Established --timeout=120s crd/loadbalancers.layerlb.dev crd/vippools.layerlb.dev
kubectl create namespace demo --dry-run=client -o yaml | kubectl apply -f - >/dev/null

say "a broken resource: the CLI and the API server refuse it with the same message"
broken=examples/invalid/engine-nftables-tunnel.yaml
$LAYERLB validate "$broken" || true
kubectl apply -f "$broken" || true

say "the operator (VIPs, Plans in ConfigMaps, forwarding-pod Deployments, status), log in /tmp/layerlb-operator.log"
$LAYERLB operator --metrics 127.0.0.1:8089 > /tmp/layerlb-operator.log 2>&1 &
OPERATOR=$!
trap 'kill $OPERATOR 2>/dev/null; wait $OPERATOR 2>/dev/null || true' EXIT

say "the examples with backends: forwarding pods run by the pod runner, traffic from a client namespace"
$PY -m e2e.runner.demo --namespace demo ${DEMO_ONCE:+--once}

say "done: the control plane keeps running (KUBECONFIG=$KUBECONFIG); stop it with: make cluster-down"
