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
# Runs cargo with its output appended to the log and shown as it comes.
# The log is followed until cargo ends, not until its output closes: a
# process a test left behind (the abort below kills a test binary before
# it can stop its redis-servers) may hold that output open for good.
logged() {
  local from pid
  from=$(($(wc -l <"$log") + 1))
  "$@" >>"$log" 2>&1 &
  pid=$!
  tail -n +"$from" --pid="$pid" -f "$log"
  wait "$pid"
}
logged cargo test --workspace --features tollgate/conformance --no-fail-fast "$@" || status=$?
# A test binary that runs many Pingora servers in one process has, rarely,
# aborted with "IO Safety violation: owned file descriptor already closed":
# an fd closed twice below Tollgate's code (which has no unsafe), not yet
# tracked down (docs/architecture.md#tests). When that abort is the only
# failure, the binaries it hit run once more; a failing test never is.
if [ "$status" != 0 ] && grep -q "IO Safety violation" "$log" && ! grep -q "^test result: FAILED" "$log"; then
  status=0
  for target in $(grep -o 'rerun pass `[^`]*`' "$log" | sed 's/rerun pass `//; s/`$//; s/ /:/g'); do
    echo "tollgate test: the known fd abort hit ${target//:/ }; running it once more" >&2
    # shellcheck disable=SC2086
    logged cargo test --features tollgate/conformance ${target//:/ } || status=$?
  done
fi
# A short fuzzing run of core's parsers (scripts/fuzz.sh; FUZZ_SECS=0 skips it).
if [ "${FUZZ_SECS:-15}" != 0 ] && [ "$status" = 0 ]; then
  bash scripts/fuzz.sh "${FUZZ_SECS:-15}" || status=$?
fi
echo
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
