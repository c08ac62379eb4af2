#!/usr/bin/env bash
# Build a local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager) and helm from
# Go modules, once, into the cache folder. Idempotent: a second run only reports the versions it finds.
#
#   e2e/cluster/build.sh            # build what is missing
#   e2e/cluster/build.sh --force    # rebuild everything
#
# Environment:
#   LAYERLB_CACHE         cache root (default: <repo>/.cache); binaries land in $LAYERLB_CACHE/k8s/bin
#   LAYERLB_K8S_VERSION   k8s.io/kubernetes version (default below; "latest" = newest v1.34.x served)
#   LAYERLB_ETCD_VERSION  go.etcd.io/etcd/server/v3 version (default below; "latest" = newest v3.6.x)
#   LAYERLB_HELM_VERSION  helm.sh/helm/v3 version (default below; "latest" = newest v3.x)
#   GO                    go binary (default: go on PATH, else /usr/local/go/bin/go)
set -euo pipefail

K8S_VERSION="${LAYERLB_K8S_VERSION:-v1.34.4}"
ETCD_VERSION="${LAYERLB_ETCD_VERSION:-v3.6.16}"
HELM_VERSION="${LAYERLB_HELM_VERSION:-v3.22.0}"

FORCE=0
if [[ "${1:-}" == "--force" ]]; then FORCE=1; fi

log() { printf '[build] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${LAYERLB_CACHE:-$ROOT/.cache}"
mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"
K8S_DIR="$CACHE/k8s"
BIN="$K8S_DIR/bin"
SRC="$K8S_DIR/src"
mkdir -p "$BIN" "$SRC"

if [[ -z "${GO:-}" ]]; then
  if command -v go >/dev/null 2>&1; then GO="$(command -v go)"
  elif [[ -x /usr/local/go/bin/go ]]; then GO=/usr/local/go/bin/go
  else die "no go toolchain found (set GO=/path/to/go)"; fi
fi

# Everything Go writes stays inside the cache, so a fresh clone builds from nothing and a rerun is instant.
export GOPATH="$CACHE/go/path"
export GOMODCACHE="$CACHE/go/mod"
export GOCACHE="$CACHE/go/build"
export GOTOOLCHAIN=local
export GOFLAGS="-modcacherw"   # module cache files stay deletable (rm -rf .cache works)
export CGO_ENABLED=0
export GOWORK=off
export GO111MODULE=on
mkdir -p "$GOPATH" "$GOMODCACHE" "$GOCACHE"

NICE=(nice -n 10)

latest() {  # latest MODULE REGEX: newest version of MODULE matching REGEX that the proxy serves
  local tmp
  tmp="$(mktemp -d)"
  (cd "$tmp" && "$GO" mod init tmp >/dev/null 2>&1 &&
    "$GO" list -m -versions "$1" | tr ' ' '\n' | grep -E "$2" | tail -1)
  rm -rf "$tmp"
}
if [[ "$K8S_VERSION" == latest ]]; then K8S_VERSION="$(latest k8s.io/kubernetes '^v1\.34\.[0-9]+$')"; fi
if [[ "$ETCD_VERSION" == latest ]]; then ETCD_VERSION="$(latest go.etcd.io/etcd/server/v3 '^v3\.6\.[0-9]+$')"; fi
if [[ "$HELM_VERSION" == latest ]]; then HELM_VERSION="$(latest helm.sh/helm/v3 '^v3\.[0-9]+\.[0-9]+$')"; fi
[[ "$K8S_VERSION" =~ ^v1\.([0-9]+)\.([0-9]+)$ ]] || die "bad kubernetes version '$K8S_VERSION'"
K8S_MINOR="${BASH_REMATCH[1]}"
K8S_PATCH="${BASH_REMATCH[2]}"
STAGING_VERSION="v0.${K8S_MINOR}.${K8S_PATCH}"

# bin_version BIN ARGS...: prints the binary's version line, or nothing when absent or broken.
bin_version() {
  [[ -x "$1" ]] || return 0
  "$@" 2>/dev/null | head -1 || true
}

START=$SECONDS
log "cache: $K8S_DIR (go: $("$GO" env GOVERSION))"

# ---------------------------------------------------------------------------------------------- etcd
etcd_have="$(bin_version "$BIN/etcd" --version)"
if [[ $FORCE == 0 && "$etcd_have" == *"etcd Version: ${ETCD_VERSION#v}"* ]]; then
  log "etcd already built: $etcd_have"
else
  log "building etcd $ETCD_VERSION (go.etcd.io/etcd/server/v3) ..."
  mod="$SRC/etcd"
  rm -rf "$mod" && mkdir -p "$mod"
  cat >"$mod/go.mod" <<EOF
module layerlb.local/etcdbuild

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
EOF
  t=$SECONDS
  (cd "$mod" && "${NICE[@]}" "$GO" build -mod=mod -trimpath -o "$BIN/etcd" go.etcd.io/etcd/server/v3) ||
    die "etcd build failed"
  log "etcd built in $((SECONDS - t)) s: $(bin_version "$BIN/etcd" --version)"
fi

# ------------------------------------------- control plane and node binaries, one build of one module
# The nodes' kubelet and kube-proxy and the scheduler come from the same wrapper module as the API
# server, so every component is the same pinned version (the node build adds ~30 s to a cold build).
want="Kubernetes $K8S_VERSION"
K8S_CMDS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)
k8s_stale=0
for cmd in "${K8S_CMDS[@]}"; do
  [[ "$(bin_version "$BIN/$cmd" --version)" == "$want" ]] || k8s_stale=1
done
if [[ $FORCE == 0 && $k8s_stale == 0 ]]; then
  log "${K8S_CMDS[*]} already built: $want"
else
  mod="$SRC/kubernetes"
  rm -rf "$mod" && mkdir -p "$mod"
  log "downloading k8s.io/kubernetes $K8S_VERSION module (large; first run only) ..."
  gomod="$(cd "$mod" && "$GO" mod init layerlb.local/k8sbuild >/dev/null 2>&1 &&
    "$GO" mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
  [[ -f "$gomod" ]] || die "could not download k8s.io/kubernetes@$K8S_VERSION"
  # The staging modules: every `k8s.io/<m> => ./staging/...` replace line of kubernetes' own go.mod.
  mapfile -t staging < <(sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\1#p' "$gomod" | sort -u)
  ((${#staging[@]} > 10)) || die "found only ${#staging[@]} staging modules in $gomod"
  log "wrapper module with ${#staging[@]} staging replaces at $STAGING_VERSION"
  edits=(-go=1.24 -require="k8s.io/kubernetes@$K8S_VERSION")
  for m in "${staging[@]}"; do edits+=(-replace="$m=$m@$STAGING_VERSION"); done
  (cd "$mod" && "$GO" mod edit "${edits[@]}")
  ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION"
  ldflags+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$K8S_MINOR"
  ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
  log "building ${K8S_CMDS[*]} $K8S_VERSION (several minutes on 2 cores) ..."
  t=$SECONDS
  (cd "$mod" && "${NICE[@]}" "$GO" build -mod=mod -trimpath -ldflags "$ldflags" -o "$BIN/" \
    "${K8S_CMDS[@]/#/k8s.io/kubernetes/cmd/}") ||
    die "kubernetes build failed"
  log "kubernetes built in $((SECONDS - t)) s: $(bin_version "$BIN/kube-apiserver" --version)"
fi

# --------------------------------------------------------------------------------------------- helm
helm_have="$(bin_version "$BIN/helm" version --short)"
if [[ $FORCE == 0 && "$helm_have" == "$HELM_VERSION"* ]]; then
  log "helm already built: $helm_have"
else
  log "building helm $HELM_VERSION ..."
  t=$SECONDS
  if GOBIN="$BIN" "${NICE[@]}" "$GO" install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"; then
    log "helm built in $((SECONDS - t)) s: $(bin_version "$BIN/helm" version --short)"
  else
    log "WARNING: helm build failed; continuing without helm"
  fi
fi

log "done in $((SECONDS - START)) s; binaries in $BIN"
for b in etcd kube-apiserver kube-controller-manager helm; do
  [[ -x "$BIN/$b" ]] && log "  $b: $(ls -l "$BIN/$b" | awk '{print $5}') bytes"
done
[[ -x "$BIN/etcd" && -x "$BIN/kube-apiserver" && -x "$BIN/kube-controller-manager" ]] ||
  die "control-plane binaries missing"
