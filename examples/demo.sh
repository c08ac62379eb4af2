#!/usr/bin/env bash
# layerlb's main job, as far as it goes today: a real local control plane, the CRDs, every example
# applied and checked by the API server, a broken one refused with layerlb's message, and what each
# example renders to. The data plane and the operator (which make the VIPs serve) are the next issues.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
LAYERLB=.venv/bin/layerlb
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "starting the local control plane (etcd, kube-apiserver, kube-controller-manager; first run builds them)"
eval "$($PY e2e/cluster/cluster.py up)"
kubectl version 2>/dev/null | sed -n 's/^Server Version: /API server /p'

say "installing the CRDs"
kubectl apply --server-side --force-conflicts -f crds/
kubectl wait --for=condition=Established --timeout=120s crd/loadbalancers.layerlb.dev crd/vippools.layerlb.dev
kubectl create namespace demo --dry-run=client -o yaml | kubectl apply -f - >/dev/null

say "validating the examples with the CLI, then applying them to the API server"
$LAYERLB validate examples/*.yaml
for example in examples/*.yaml; do kubectl apply -f "$example"; done
kubectl get vippools
kubectl get loadbalancers -n demo

say "a broken resource: the CLI and the API server refuse it with the same message"
broken=examples/invalid/engine-nftables-tunnel.yaml
$LAYERLB validate "$broken" || true
kubectl apply -f "$broken" || true

say "what the examples render to"
for format in dataplane ipvs nftables haproxy; do
  for example in examples/l*.yaml; do
    if out=$($LAYERLB render --format "$format" "$example" 2>/dev/null); then
      printf -- '--- %s as %s (%s lines)\n' "$example" "$format" "$(wc -l <<<"$out")"
      head -n 12 <<<"$out" | sed 's/^/    /'
    fi
  done
done

say "done: the control plane keeps running (KUBECONFIG=$KUBECONFIG); stop it with: make cluster-down"
