#!/usr/bin/env bash
# The scale of state: how `tollgate check`, `tollgate run` (time to ready and
# RSS), one `keys create`, and the running proxy's uptake of that change
# (until the new key is let in) behave with a synthesized store of N keys,
# one customer each. Prints one markdown row per N (issue 16's table).
#
#   benches/scale.sh [N ...]              default: 10000 100000; the file store
#   STORE=redis benches/scale.sh [N ...]  the Redis store, on its own redis-server
#
# Builds the release binary if needed. Uses free ports on loopback and a
# temporary directory; the upstream is never called (an admitted key gets
# 502 from it, a refused one 401).
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(10000 100000)
cargo build --release -q -p tollgate
bin=$PWD/target/release/tollgate
work=$(mktemp -d)
store=${STORE:-file}
trap 'kill $pid $redis_pid 2>/dev/null || true; rm -rf "$work"' EXIT
pid=
redis_pid=

rss_mb() { awk '/VmRSS/ {printf "%d", $2/1024}' "/proc/$1/status"; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$2"; }
now() { date +%s.%N; }

echo "store: $store"
echo "| keys | \`tollgate check\` | \`run\` ready | RSS | one \`keys create\` | the proxy lets it in after | RSS after that change |"
echo "|---|---|---|---|---|---|---|"
for n in "${sizes[@]}"; do
  dir=$work/$n
  mkdir -p "$dir"
  printf 'default_plan: free\nplans:\n  free:\n    limits:\n      - { name: burst, requests: 10, per: second }\n' >"$dir/plans.yaml"
  port=$(port); admin=$(port)
  if [ "$store" = redis ]; then
    rport=$(port)
    redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no >"$dir/redis.log" 2>&1 &
    redis_pid=$!
    wait_port "$rport"
    keys="keys: { store: redis }
redis: { url: \"redis://127.0.0.1:$rport\" }"
  else
    keys="keys: { path: keys.db }"
  fi
  printf 'listen: 127.0.0.1:%s\nupstream: http://127.0.0.1:9\n%s\nadmin: { listen: 127.0.0.1:%s }\naccess_log: { enabled: false }\nmetering: { enabled: false }\n' \
    "$port" "$keys" "$admin" >"$dir/tollgate.yaml"
  # N keys, one customer each, in the store's format (hashes are random:
  # no key of these is usable, which does not matter here). For Redis, the
  # layout of proxy/redis/src/store/mod.rs as redis-cli --pipe commands.
  python3 - "$dir/keys.db" "$n" "$store" <<'EOF'
import json, os, sys
path, n, store = sys.argv[1], int(sys.argv[2]), sys.argv[3]
alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
def kid(i):
    s = ""
    for _ in range(16):
        s = alphabet[i % 62] + s
        i //= 62
    return "key_" + s
keys = [{"id": kid(i), "hash": os.urandom(32).hex(), "start": "tg_live_AAAA",
         "customer": f"cus_{i}", "created": "2026-12-01T00:00:00Z"} for i in range(n)]
if store == "file":
    json.dump({"version": 1, "customers": {f"cus_{i}": {} for i in range(n)}, "keys": keys},
              open(path, "w"))
    sys.exit()
def cmd(*args):
    out = [f"*{len(args)}\r\n"]
    for a in args:
        out.append(f"${len(a.encode())}\r\n{a}\r\n")
    return "".join(out)
with open(path, "w") as f:
    for k in keys:
        f.write(cmd("HSET", "tg:key:" + k["hash"], "id", k["id"], "start", k["start"],
                    "customer", k["customer"], "created", k["created"]))
        f.write(cmd("SET", "tg:keyid:" + k["id"], k["hash"]))
        f.write(cmd("SADD", "tg:keys", k["hash"]))
        f.write(cmd("HSET", "tg:customer:" + k["customer"], "suspended", "0"))
        f.write(cmd("SADD", "tg:customers", k["customer"]))
    f.write(cmd("SET", "tg:version", "1"))
EOF
  if [ "$store" = redis ]; then
    redis-cli -p "$rport" --pipe <"$dir/keys.db" >/dev/null
  fi
  t0=$(now); (cd "$dir" && "$bin" check -c tollgate.yaml >"$dir/check.log" 2>&1) || { cat "$dir/check.log" >&2; exit 1; }; t1=$(now)
  check=$(elapsed "$t0" "$t1")
  t0=$(now)
  (cd "$dir" && RUST_LOG=error exec "$bin" run -c tollgate.yaml >/dev/null 2>"$dir/run.log") &
  pid=$!
  until curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || { echo "tollgate run exited:" >&2; cat "$dir/run.log" >&2; exit 1; }
    sleep 0.02
  done
  t1=$(now)
  ready=$(elapsed "$t0" "$t1")
  sleep 1
  rss=$(rss_mb "$pid")
  t0=$(now)
  key=$(cd "$dir" && "$bin" keys create --customer cus_new -c tollgate.yaml 2>/dev/null | grep -o 'tg_live_[A-Za-z0-9]*')
  t1=$(now)
  create=$(elapsed "$t0" "$t1")
  until [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $key" "http://127.0.0.1:$port/x")" != 401 ]; do
    sleep 0.01
  done
  seen=$(elapsed "$t1" "$(now)")
  sleep 1
  rss2=$(rss_mb "$pid")
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  if [ -n "$redis_pid" ]; then kill "$redis_pid"; wait "$redis_pid" 2>/dev/null || true; redis_pid=; fi
  echo "| $n | ${check} s | ${ready} s | ${rss} MB | ${create} s | ${seen} s | ${rss2} MB |"
done
