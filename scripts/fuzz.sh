#!/usr/bin/env bash
# Fuzzes core's parsers (request paths, plans.yaml, key headers, webhook
# signatures and payloads) with cargo-fuzz / libFuzzer, each target for a while, starting from the seeds
# in proxy/core/fuzz/seeds. A crash exits non-zero and leaves its input in
# proxy/core/fuzz/artifacts/<target>/; make it a regression test and a seed.
#
#   scripts/fuzz.sh [seconds per target=15] [target ...]
#
# cargo-fuzz needs `-Zsanitizer`, a nightly flag; this project builds with
# the stable toolchain only, so RUSTC_BOOTSTRAP=1 unlocks it for these
# builds alone (nothing else is built that way).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
secs=${1:-15}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(canonical_path plans keys signatures)
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
cd proxy/core
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  echo "fuzz: $t for ${secs}s"
  cargo fuzz run -O "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
    -max_total_time="$secs" -max_len=4096 -print_final_stats=0 2>&1 | grep -E "^(Done|==|SUMMARY)|panicked" || true
  if [ -d "fuzz/artifacts/$t" ] && [ -n "$(ls -A "fuzz/artifacts/$t")" ]; then
    echo "fuzz: $t found a crash: $(ls "fuzz/artifacts/$t")" >&2
    exit 1
  fi
done
echo "fuzz: ${#targets[@]} targets, no crash"
