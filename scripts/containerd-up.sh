#!/usr/bin/env bash
# Makes sure the node's containerd runs with its own CRI plugin disabled
# (imacri is the CRI server) and answers on /run/containerd/containerd.sock.
set -euo pipefail

cfg=/etc/containerd/config.toml
sock=/run/containerd/containerd.sock
mkdir -p /etc/containerd
changed=0
if [ ! -f "$cfg" ]; then
  cat >"$cfg" <<'TOML'
version = 2
# imacri serves CRI; containerd's own CRI plugin must stay off.
disabled_plugins = ["io.containerd.grpc.v1.cri"]
TOML
  changed=1
elif ! grep -Eq '^[[:space:]]*disabled_plugins[[:space:]]*=.*"io\.containerd\.grpc\.v1\.cri"' "$cfg"; then
  # (Debian's default config names the plugin in [plugins.*] tables: only a
  # disabled_plugins entry counts.)
  cp "$cfg" "$cfg.imacri-backup"
  if grep -q '^disabled_plugins' "$cfg"; then
    sed -i 's/^disabled_plugins *= *\[/disabled_plugins = ["io.containerd.grpc.v1.cri", /' "$cfg"
  else
    sed -i '1i disabled_plugins = ["io.containerd.grpc.v1.cri"]' "$cfg"
  fi
  changed=1
fi

running() { ctr --address "$sock" version >/dev/null 2>&1; }
if command -v systemctl >/dev/null && systemctl is-system-running >/dev/null 2>&1; then
  if ((changed)) || ! running; then systemctl restart containerd; fi
else
  if running && ((changed)); then
    # The node's containerd runs without arguments (test instances have --config).
    pkill -xf containerd || true
    for _ in $(seq 100); do running || break; sleep 0.1; done
    sleep 0.5
  fi
  if ! running; then
    nohup containerd >>/var/log/containerd.log 2>&1 &
  fi
fi
for _ in $(seq 100); do running && exit 0; sleep 0.1; done
echo "containerd did not come up (see /var/log/containerd.log or journalctl -u containerd)" >&2
exit 1
