#!/usr/bin/env bash
# Builds imacri and runs every test (unit and end-to-end), then prints one
# closing line with the totals.
set -uo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins || exit 1
# crictl, critest, grpcio and the critest images' busybox, cached by version.
scripts/test-tools.sh >/dev/null || exit 1
log=$(mktemp)
cargo test --workspace --no-fail-fast --lib --bins --tests 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
read -r passed failed < <(awk '/^test result:/ {p += $4; f += $6} END {print p+0, f+0}' "$log")
rm -f "$log"
# Every test process has exited: nothing of theirs may be left running or
# mounted (shims, mounts, bridges, temp dirs).
if target/debug/leftovers; then
  passed=$((passed + 1))
else
  failed=$((failed + 1))
  [ "$status" -ne 0 ] || status=1
fi
echo
echo "total: ${passed} passed, ${failed} failed"
exit "$status"
