#!/usr/bin/env bash
# The peers the tests drive, cached by version outside the checkout so only
# the first run pays for them:
# - crictl and critest, built from the Go module proxy at a pinned version
#   (never prebuilt downloads);
# - kubelet, built from k8s.io/kubernetes through integration/kubelet/go.mod;
# - Python grpcio from PyPI in a virtualenv (a gRPC C-core client);
# - Debian's dynamically linked busybox, unpacked (not installed: it conflicts
#   with busybox-static), for critest's stand-in images.
#   scripts/test-tools.sh          make what is missing, print the cache dir
set -euo pipefail

CRI_TOOLS_VERSION=${CRI_TOOLS_VERSION:-v1.37.0}
GRPCIO_VERSION=${GRPCIO_VERSION:-1.85.1}
# Must match the k8s.io/kubernetes version in integration/kubelet/go.mod.
KUBELET_VERSION=${KUBELET_VERSION:-v1.37.2}
cache=${IMACRI_TOOLS_CACHE:-/var/cache/imacri-tools}
export PATH=/usr/local/go/bin:$PATH
command -v go >/dev/null || { echo "test-tools: Go (1.26, /usr/local/go) is required to build crictl, critest and kubelet" >&2; exit 1; }
export GOFLAGS=-buildvcs=false GOTOOLCHAIN=local
# Go's build cache for kubelet alone is ~3 GB: a builder's own, removed when
# it is done, so a machine keeps only the binaries (CI's disk is small).
GOCACHE=$(mktemp -d /tmp/imacri-gocache.XXXXXX)
export GOCACHE
trap 'rm -rf "$GOCACHE"' EXIT

cri_tools() {
  local out="$cache/cri-tools-$CRI_TOOLS_VERSION"
  [ -x "$out/crictl" ] && [ -x "$out/critest" ] && return 0
  echo "building crictl and critest $CRI_TOOLS_VERSION (cached in $out)" >&2
  local src dir
  src=$(cd /tmp && go mod download -json "sigs.k8s.io/cri-tools@$CRI_TOOLS_VERSION" |
    sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  dir=$(mktemp -d)
  # The module cache is read-only; build from a copy so cri-tools' own go.mod
  # (with its replace directives) is the main module.
  cp -r "$src/." "$dir/"
  chmod -R u+w "$dir"
  mkdir -p "$out.tmp"
  (cd "$dir" &&
    CGO_ENABLED=0 go build -trimpath -o "$out.tmp/crictl" ./cmd/crictl &&
    CGO_ENABLED=0 go test -c -trimpath -o "$out.tmp/critest" ./cmd/critest)
  rm -rf "$dir" "$out"
  mv "$out.tmp" "$out"
}

busybox_dynamic() {
  local out="$cache/busybox-deb"
  [ -x "$out/bin/busybox" ] && return 0
  local tmp
  tmp=$(mktemp -d)
  (cd "$tmp" && { apt-get download -q busybox >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get download -q busybox >/dev/null; }; })
  rm -rf "$out.tmp"
  dpkg-deb -x "$tmp"/busybox_*.deb "$out.tmp"
  rm -rf "$tmp" "$out"
  mv "$out.tmp" "$out"
}

grpcio() {
  local out="$cache/grpcio-$GRPCIO_VERSION"
  [ -x "$out/bin/python3" ] && "$out/bin/python3" -c 'import grpc' 2>/dev/null && return 0
  echo "installing grpcio $GRPCIO_VERSION (cached in $out)" >&2
  rm -rf "$out"
  python3 -m venv "$out" >&2
  "$out/bin/pip" install -q "grpcio==$GRPCIO_VERSION" >&2
}

kubelet() {
  local out="$cache/kubelet-$KUBELET_VERSION"
  [ -x "$out/kubelet" ] && return 0
  echo "building kubelet $KUBELET_VERSION (cached in $out; ~6 minutes on 2 cores)" >&2
  rm -rf "$out.tmp"
  mkdir -p "$out.tmp"
  (cd "$(dirname "$0")/../integration/kubelet" &&
    GOFLAGS="-buildvcs=false -mod=readonly" CGO_ENABLED=0 \
      go build -trimpath -ldflags "-X k8s.io/component-base/version.gitVersion=$KUBELET_VERSION \
        -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=37" \
        -o "$out.tmp/kubelet" k8s.io/kubernetes/cmd/kubelet)
  rm -rf "$out"
  mv "$out.tmp" "$out"
}

mkdir -p "$cache"
cri_tools
kubelet
grpcio
busybox_dynamic
echo "$cache"
