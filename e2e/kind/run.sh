#!/usr/bin/env bash
# `make kind-e2e`: the e2e suite on kind, where Docker exists (a laptop, GitHub Actions).
# Builds the image from the Dockerfile, creates the kind cluster of e2e/kind/cluster.yaml (or reuses it),
# loads the image, installs the CRDs and the operator with the Helm chart (image overridden by
# e2e/kind/values.yaml), then runs
# the real-node suite (e2e/nodes, the same tests `make test` runs on local nodes) against it.
#
# Needs docker, kind, kubectl, helm on PATH (helm falls back to the local cluster's build in .cache) and
# `make setup` done. The IPVS and IP-in-IP examples need the host's ip_vs* and ipip modules: loaded below
# when this user may (root or passwordless sudo), otherwise those examples fail to become Ready.
# KIND_KEEP=1 leaves the cluster running afterwards; extra arguments go to pytest (e.g. -k udp).
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER="${KIND_CLUSTER:-layerlb-e2e}"
IMAGE="layerlb:kind-e2e"  # as in e2e/kind/values.yaml
NAMESPACE="llb-kind"      # likewise
PY="${PY:-.venv/bin/python}"
HELM="${HELM:-$(command -v helm || echo "${LAYERLB_CACHE:-$PWD/.cache}/k8s/bin/helm")}"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

for tool in docker kind kubectl "$HELM" "$PY"; do
    command -v "$tool" >/dev/null || { echo "run.sh: $tool not found (see the comment at the top)" >&2; exit 1; }
done
docker info >/dev/null 2>&1 || { echo "run.sh: no Docker engine answers (docker info failed)" >&2; exit 1; }

say "building $IMAGE from the Dockerfile"
docker build -t "$IMAGE" .

say "kind cluster $CLUSTER"
if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    kind create cluster --name "$CLUSTER" --config e2e/kind/cluster.yaml --wait 180s
fi
KUBECONFIG="$(mktemp -t "kind-$CLUSTER.XXXXXX")"
export KUBECONFIG
kind get kubeconfig --name "$CLUSTER" > "$KUBECONFIG"
cleanup() {
    if [ "${KIND_KEEP:-0}" = 1 ]; then
        echo "kept: kind cluster $CLUSTER (KUBECONFIG=$KUBECONFIG); remove with: kind delete cluster --name $CLUSTER"
    else
        kind delete cluster --name "$CLUSTER" || true
        rm -f "$KUBECONFIG"
    fi
}
trap cleanup EXIT
kind load docker-image "$IMAGE" --name "$CLUSTER"

say "kernel modules for the IPVS and IP-in-IP examples (best effort)"
modules=(ip_vs ip_vs_rr ip_vs_wrr ip_vs_sh ip_vs_mh ipip)
if [ "$(id -u)" = 0 ]; then
    modprobe -a "${modules[@]}" || echo "some modules are missing: the IPVS/IPIP examples will not become Ready"
elif sudo -n true 2>/dev/null; then
    sudo -n modprobe -a "${modules[@]}" || echo "some modules are missing: the IPVS/IPIP examples will not become Ready"
else
    echo "cannot load ${modules[*]} (not root, no passwordless sudo); the IPVS/IPIP examples need them"
fi

say "CRDs and the operator, from the Helm chart (watching $NAMESPACE)"
kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f -
"$HELM" upgrade --install layerlb charts/layerlb --namespace layerlb-system --create-namespace \
    -f e2e/kind/values.yaml --wait --timeout 5m
kubectl wait --for=condition=Established --timeout=120s crd/loadbalancers.layerlb.dev crd/vippools.layerlb.dev
kubectl rollout status deployment -n layerlb-system --timeout=180s

say "the e2e suite on kind"
LAYERLB_KIND_CLUSTER="$CLUSTER" LAYERLB_KIND_IMAGE="$IMAGE" LAYERLB_KIND_NAMESPACE="$NAMESPACE" \
    PYTHONPATH="$PWD:$PWD/operator:$PWD/dataplane${PYTHONPATH:+:$PYTHONPATH}" \
    "$PY" -m pytest -q -p no:cacheprovider e2e/nodes "$@"
