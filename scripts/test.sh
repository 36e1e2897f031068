#!/usr/bin/env bash
# One command: install what is missing, then run every test (unit,
# integration, CLI, soak, doc) of the workspace and a short fuzzing run, and
# print the total.
set -euo pipefail
cd "$(dirname "$0")/.."
TOLLGATE_SETUP=test . scripts/setup.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --features tollgate/conformance "$@" 2>&1 | tee "$log" || status=$?
# A short fuzzing run of core's parsers (scripts/fuzz.sh; FUZZ_SECS=0 skips it).
if [ "${FUZZ_SECS:-15}" != 0 ] && [ "$status" = 0 ]; then
  bash scripts/fuzz.sh "${FUZZ_SECS:-15}" || status=$?
fi
echo
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
