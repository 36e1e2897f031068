#!/usr/bin/env bash
# The soak test at full length: the real binary under sustained load with
# keys created and revoked and the key store reloaded all along, its RSS
# sampled every 10 s (bounded), no 5xx. CI runs the same test for 2 minutes.
#
#   scripts/soak.sh [minutes=10]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
TOLLGATE_SOAK_SECS=$(( ${1:-10} * 60 )) cargo test -p tollgate --test soak -- --nocapture
