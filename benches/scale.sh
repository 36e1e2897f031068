#!/usr/bin/env bash
# The scale of state: how `tollgate check`, `tollgate run` (time to ready and
# RSS) and one `keys create` behave with a synthesized file store of N keys,
# one customer each. Prints one markdown row per N (issue 16's table).
#
#   benches/scale.sh [N ...]        default: 10000 100000
#
# Builds the release binary if needed. Uses free ports on loopback and a
# temporary directory; the upstream is never called.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(10000 100000)
cargo build --release -q -p tollgate
bin=$PWD/target/release/tollgate
work=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
pid=

rss_mb() { awk '/VmRSS/ {printf "%d", $2/1024}' "/proc/$1/status"; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$2"; }
now() { date +%s.%N; }

echo "| keys | \`tollgate check\` | \`run\` ready | RSS | one \`keys create\` | RSS after that change |"
echo "|---|---|---|---|---|---|"
for n in "${sizes[@]}"; do
  dir=$work/$n
  mkdir -p "$dir"
  printf 'default_plan: free\nplans:\n  free:\n    limits:\n      - { name: burst, requests: 10, per: second }\n' >"$dir/plans.yaml"
  port=$(port); admin=$(port)
  printf 'listen: 127.0.0.1:%s\nupstream: http://127.0.0.1:9\nkeys: { path: keys.db }\nadmin: { listen: 127.0.0.1:%s }\naccess_log: { enabled: false }\nmetering: { enabled: false }\n' \
    "$port" "$admin" >"$dir/tollgate.yaml"
  # N keys, one customer each, in the file store's format (hashes are
  # random: no key of these is usable, which does not matter here).
  python3 - "$dir/keys.db" "$n" <<'EOF'
import json, os, sys
path, n = sys.argv[1], int(sys.argv[2])
alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
def kid(i):
    s = ""
    for _ in range(16):
        s = alphabet[i % 62] + s
        i //= 62
    return "key_" + s
keys = [{"id": kid(i), "hash": os.urandom(32).hex(), "start": "tg_live_AAAA",
         "customer": f"cus_{i}", "created": "2026-12-01T00:00:00Z"} for i in range(n)]
json.dump({"version": 1, "customers": {f"cus_{i}": {} for i in range(n)}, "keys": keys},
          open(path, "w"))
EOF
  t0=$(now); (cd "$dir" && "$bin" check -c tollgate.yaml >/dev/null 2>&1); t1=$(now)
  check=$(elapsed "$t0" "$t1")
  t0=$(now)
  (cd "$dir" && RUST_LOG=error exec "$bin" run -c tollgate.yaml >/dev/null 2>&1) &
  pid=$!
  until curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1; do sleep 0.02; done
  t1=$(now)
  ready=$(elapsed "$t0" "$t1")
  sleep 1
  rss=$(rss_mb "$pid")
  t0=$(now); (cd "$dir" && "$bin" keys create --customer cus_new -c tollgate.yaml >/dev/null 2>&1); t1=$(now)
  create=$(elapsed "$t0" "$t1")
  # The running proxy picks the change up within a second or two.
  sleep 3
  rss2=$(rss_mb "$pid")
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  echo "| $n | ${check} s | ${ready} s | ${rss} MB | ${create} s | ${rss2} MB |"
done
