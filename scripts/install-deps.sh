#!/usr/bin/env bash
# Installs what imacri needs on Debian 12: containerd, runc, CNI plugins, the
# TPM software stack (tss-esapi links libtss2), and
# (for the tests) the registry, skopeo, umoci, busybox-static, the TPM
# simulator, Go 1.19 with spdystream (a real SPDY peer), Python's venv
# (grpcio) and the host tools critest's stand-in images copy (pgrep,
# ipcs). crictl, critest and kubelet are built by scripts/test-tools.sh
# with the Go toolchain from /usr/local/go. Idempotent:
# only missing packages are installed.
set -euo pipefail

packages=(
  containerd runc containernetworking-plugins iproute2 iptables
  protobuf-compiler pkg-config gcc libc6-dev make
  docker-registry skopeo umoci busybox-static curl ca-certificates openssl
  libtss2-dev swtpm swtpm-tools tpm2-tools criu
  golang-1.19-go golang-github-docker-spdystream-dev
  python3 python3-venv procps util-linux
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts the registry as a service on :5000; the tests run their own.
if command -v systemctl >/dev/null && systemctl is-active -q docker-registry 2>/dev/null; then
  systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi
if ! command -v cargo >/dev/null; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    echo "cargo is in $HOME/.cargo/bin: add it to PATH" >&2
  else
    echo "installing the Rust toolchain with rustup (Debian 12's rustc is too old)"
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  fi
fi
