#!/usr/bin/env bash
# Instructions per request, the figure that does not swing on a shared box:
# the bare Pingora passthrough and Tollgate on memory (metering to the spool
# and the access log to a file, as in production; ACCESS_LOG and METERING
# change that) each run under valgrind's callgrind, their counters zeroed
# once warm, then driven by wrk for a fixed time at 4 connections; the
# instructions of the measured window (all threads) over the requests wrk
# completed in it. Profiles are kept for callgrind_annotate.
#
#   benches/callgrind.sh [seconds=10] [out dir=target/callgrind]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
. benches/common.sh
for tool in wrk nginx valgrind; do
  command -v $tool >/dev/null 2>&1 || { echo "installing $tool" >&2; apt-get install -y -qq $tool >/dev/null; }
done
secs=${1:-10}
out=${2:-target/callgrind}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cargo build --release --quiet -p tollgate --bin tollgate --example passthrough
bin=$PWD/target/release/tollgate
pass=$PWD/target/release/examples/passthrough

work=$(mktemp -d)
pids=()
cleanup() { kill -9 "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
up=$(port); pt=$(port); tg=$(port); adm=$(port)

nginx_conf "$work/nginx" $up
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" & pids+=($!)
bench_plans "$work/plans.yaml"
cat > "$work/tollgate.yaml" <<CFG
listen: 127.0.0.1:$tg
upstream: http://127.0.0.1:$up
keys: { path: keys.db }
admin: { listen: 127.0.0.1:$adm }
threads: 1
${METERING:-"metering: { spool_dir: spool }"}
${ACCESS_LOG:-"access_log: { to: access.log }"}
CFG
key=$("$bin" -c "$work/tollgate.yaml" keys create --customer cus_bench 2>/dev/null)
vg() { exec valgrind --tool=callgrind --callgrind-out-file="$out/$1.%p.out" "${@:2}"; }
vg passthrough "$pass" 127.0.0.1:$pt 127.0.0.1:$up 1 >/dev/null 2>"$work/pt.err" & pids+=($!); pid_pt=$!
RUST_LOG=error vg tollgate "$bin" -c "$work/tollgate.yaml" run >/dev/null 2>"$work/tg.err" & pids+=($!); pid_tg=$!
for p in $up $pt $tg; do wait_port $p; done

measure() { # name pid url [header]
  local hdr=(); [ -n "${4:-}" ] && hdr=(-H "$4")
  wrk -t1 -c4 -d3s "${hdr[@]}" "$3" >/dev/null   # warm: connections, pools, caches
  rm -f "$out/$1".*.out.*
  callgrind_control -z "$2" >/dev/null
  wrk -t1 -c4 -d"${secs}s" "${hdr[@]}" "$3" > "$work/$1.wrk"
  callgrind_control -d "$2" >/dev/null
  sleep 1
  local n ir
  n=$(awk '/requests in/ {print $1}' "$work/$1.wrk")
  ir=$(cat "$out/$1".*.out.* | awk '/^summary:/ {s += $2} END {print s}')
  echo "$1 $n $ir"
}
{
  measure passthrough $pid_pt "http://127.0.0.1:$pt/v1/x"
  measure tollgate $pid_tg "http://127.0.0.1:$tg/v1/x" "Authorization: Bearer $key"
} > "$work/result"
python3 - "$work/result" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1])]
base = None
print(f"{'target':<14}{'requests':>10}{'instructions/request':>24}{'vs passthrough':>16}")
for name, n, ir in rows:
    per = int(ir) / int(n)
    base = base or per
    print(f"{name:<14}{n:>10}{per:>24,.0f}{per / base:>16.2f}")
PY
echo "profiles: $out (callgrind_annotate --inclusive=yes <file>)" >&2
