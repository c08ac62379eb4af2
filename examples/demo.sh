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

say "the operator: VIPs, Plans in ConfigMaps, forwarding-pod Deployments, status conditions"
$LAYERLB operator --metrics 127.0.0.1:8089 > /tmp/layerlb-operator.log 2>&1 &
OPERATOR=$!
kubectl wait --for=condition=Programmed --timeout=120s loadbalancers --all -n demo || tail -20 /tmp/layerlb-operator.log
kubectl get loadbalancers -n demo
kubectl get configmaps,deployments -n demo -l app.kubernetes.io/name=layerlb
echo "(no kubelet runs here, so the forwarding pods stay Pending and Ready stays False: the next issue's pod runner starts them)"
kill $OPERATOR; wait $OPERATOR 2>/dev/null || true

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

say "the data plane serving real traffic: layerlb serve of the L7 routes and L4 TCP examples"
coproc BACKENDS { exec $PY examples/backends.py; }
read -r _ <&"${BACKENDS[0]}"
$LAYERLB serve examples/l7-proxy-routes.yaml examples/l4-proxy-tcp.yaml --admin 127.0.0.1:9090 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null; kill $BACKENDS_PID 2>/dev/null' EXIT
for _ in $(seq 100); do curl -fs http://127.0.0.1:9090/readyz >/dev/null && break; sleep 0.2; done
echo "GET api.example.com/v1/items   -> $(curl -s -H 'Host: api.example.com' http://127.0.0.10:8080/v1/items)"
echo "GET www.example.com/static/a   -> $(curl -s -H 'Host: www.example.com' http://127.0.0.10:8080/static/a)"
echo "GET shop.example.com/          -> $(curl -s -H 'Host: shop.example.com' http://127.0.0.10:8080/)"
for i in 1 2 3; do echo "L4 TCP 127.0.0.11:8080 (#$i)    -> $(curl -s http://127.0.0.11:8080/)"; done
echo "metrics: $(curl -s http://127.0.0.1:9090/metrics | grep -c '^layerlb_') series at http://127.0.0.1:9090/metrics"
kill $SERVE; wait $SERVE || true

say "done: the control plane keeps running (KUBECONFIG=$KUBECONFIG); stop it with: make cluster-down"
