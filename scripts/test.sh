#!/usr/bin/env bash
# One command: install what is missing, then run every test (unit,
# integration, CLI, doc) of the workspace, and print the total.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --features tollgate/conformance "$@" 2>&1 | tee "$log" || status=$?
echo
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
