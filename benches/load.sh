#!/usr/bin/env bash
# Load comparison in one run, on this machine: nginx as a reverse proxy, a
# bare Pingora passthrough, Tollgate on memory and Tollgate on Redis, all in
# front of the same fast upstream (nginx answering 200 itself), each driven
# by wrk with the same connections and duration. Prints requests/s, CPU
# per request of each process, p50/p90/p99 latency (and the p99 added
# over the passthrough's), ratios, and Redis round trips per request from
# INFO commandstats.
#
#   benches/load.sh [seconds=10] [connections=32] [rounds=3]
#
# Targets are measured in interleaved rounds and each is reported by its
# median, so drift on a shared machine does not favour one of them.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
. benches/common.sh
for tool in wrk nginx; do
  command -v $tool >/dev/null 2>&1 || { echo "installing $tool" >&2; apt-get install -y -qq $tool >/dev/null 2>&1 || apt-get install -y -qq nginx-light >/dev/null; }
done
secs=${1:-10}
conns=${2:-32}
rounds=${3:-3}
# ONLY="passthrough memory" limits the run to some targets (for iterating).
only=${ONLY:-}
cargo build --release --quiet -p tollgate --bin tollgate --example passthrough
bin=target/release/tollgate
pass=target/release/examples/passthrough

work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT


up=$(port); ngx=$(port); pt=$(port); tgm=$(port); tgr=$(port); tgo=$(port); adm1=$(port); adm2=$(port); adm3=$(port); rport=$(port)

nginx_conf "$work/nginx" $up "upstream api { server 127.0.0.1:$up; keepalive 256; }
  server { listen 127.0.0.1:$ngx;
    location / { proxy_pass http://api; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" & pids+=($!); pid_nginx=$!
"$pass" 127.0.0.1:$pt 127.0.0.1:$up 1 >/dev/null 2>&1 & pids+=($!); pid_passthrough=$!
redis-server --port $rport --bind 127.0.0.1 --save "" --appendonly no >/dev/null & pids+=($!); pid_redis_server=$!

bench_plans "$work/plans.yaml"
# Every feature on: the access log goes to a file, as in production
# (ACCESS_LOG="access_log: { enabled: false }" measures without it).
access=${ACCESS_LOG:-"access_log: { to: access.log }"}
cat > "$work/memory.yaml" <<CFG
listen: 127.0.0.1:$tgm
upstream: http://127.0.0.1:$up
keys: { path: keys.db }
admin: { listen: 127.0.0.1:$adm1 }
metering: { spool_dir: spool-memory }
threads: 1
$access
CFG
cat > "$work/nometer.yaml" <<CFG
listen: 127.0.0.1:$tgo
upstream: http://127.0.0.1:$up
keys: { path: keys.db }
admin: { listen: 127.0.0.1:$adm3 }
metering: { enabled: false }
threads: 1
$access
CFG
cat > "$work/redis.yaml" <<CFG
listen: 127.0.0.1:$tgr
upstream: http://127.0.0.1:$up
keys: { store: redis }
limits: { backend: redis }
redis: { url: "redis://127.0.0.1:$rport", timeout: 500ms }
admin: { listen: 127.0.0.1:$adm2 }
metering: { spool_dir: spool-redis }
threads: 1
$access
CFG
wait_port $rport
key_m=$("$bin" -c "$work/memory.yaml" keys create --customer cus_bench 2>/dev/null)
key_r=$("$bin" -c "$work/redis.yaml" keys create --customer cus_bench 2>/dev/null)
RUST_LOG=error "$bin" -c "$work/memory.yaml" run & pids+=($!); pid_memory=$!
RUST_LOG=error "$bin" -c "$work/nometer.yaml" run & pids+=($!); pid_nometer=$!
RUST_LOG=error "$bin" -c "$work/redis.yaml" run & pids+=($!); pid_redis=$!
for p in $up $ngx $pt $tgm $tgo $tgr; do wait_port $p; done

# CPU time (clock ticks) a process has used so far, threads included.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
run() { # name url [header] -> appends to "$work/$name.txt" and its CPU use to "$work/$name.cpu"
  case " $only " in *" $1 "*|"  ") ;; *) return 0 ;; esac
  local pid_var="pid_$1" p0 r0
  p0=$(ticks "${!pid_var}"); r0=$(ticks "$pid_redis_server")
  if [ -n "${3:-}" ]; then wrk --latency -t1 -c"$conns" -d"${secs}s" -H "$3" "$2"; else wrk --latency -t1 -c"$conns" -d"${secs}s" "$2"; fi >> "$work/$1.txt"
  echo "$(( $(ticks "${!pid_var}") - p0 )) $(( $(ticks "$pid_redis_server") - r0 ))" >> "$work/$1.cpu"
}
echo "warming up…" >&2
for u in $ngx $pt $tgm $tgo; do wrk -t1 -c8 -d2s -H "Authorization: Bearer $key_m" http://127.0.0.1:$u/v1/x >/dev/null; done
wrk -t1 -c8 -d2s -H "Authorization: Bearer $key_r" http://127.0.0.1:$tgr/v1/x >/dev/null

echo "measuring: $rounds rounds, targets interleaved, ${secs}s each…" >&2
redis-cli -p $rport config resetstat >/dev/null
for r in $(seq 1 "$rounds"); do
  run nginx http://127.0.0.1:$ngx/v1/x
  run passthrough http://127.0.0.1:$pt/v1/x
  # Metering on and off run back to back, in alternating order, so each
  # round gives one fair on/off pair.
  if [ $((r % 2)) -eq 1 ]; then
    run memory http://127.0.0.1:$tgm/v1/x "Authorization: Bearer $key_m"
    run nometer http://127.0.0.1:$tgo/v1/x "Authorization: Bearer $key_m"
  else
    run nometer http://127.0.0.1:$tgo/v1/x "Authorization: Bearer $key_m"
    run memory http://127.0.0.1:$tgm/v1/x "Authorization: Bearer $key_m"
  fi
  run redis http://127.0.0.1:$tgr/v1/x "Authorization: Bearer $key_r"
done
redis-cli -p $rport info commandstats > "$work/redis-known.txt"
# A well-formed key (valid checksum) nobody issued: looked up once, then
# remembered as unknown.
guess=$(python3 -c '
import random, zlib
a = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
k = "tg_live_" + "".join(random.choice(a) for _ in range(43))
n = zlib.crc32(k.encode()); s = ""
for _ in range(6): s = a[n % 62] + s; n //= 62
print(k + s)')
redis-cli -p $rport config resetstat >/dev/null
wrk -t1 -c8 -d3s -H "Authorization: Bearer $guess" http://127.0.0.1:$tgr/v1/x > "$work/unknown.txt"
redis-cli -p $rport info commandstats > "$work/redis-unknown.txt"

python3 - "$work" "$(getconf CLK_TCK)" <<'PY'
import re, sys, os
w, tick = sys.argv[1], 1e6 / int(sys.argv[2])
def wrk(name):
    path = os.path.join(w, name + ".txt")
    if not os.path.exists(path):
        return None
    t = open(path).read()
    rounds = [float(x) for x in re.findall(r"Requests/sec:\s+([\d.]+)", t)]
    rps = sorted(rounds)
    n = sum(int(x) for x in re.findall(r"(\d+) requests in", t))
    bad = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", t))
    cpu = [0, 0]
    if os.path.exists(os.path.join(w, name + ".cpu")):
        for line in open(os.path.join(w, name + ".cpu")):
            a, b = line.split()
            cpu[0] += int(a); cpu[1] += int(b)
    print(f"  {name}: " + ", ".join(f"{x:.0f}" for x in rps))
    # wrk --latency: each round's 50/90/99th percentiles; the median round's of each.
    unit = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    lat = {}
    for pct, v, u in re.findall(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s)$", t, re.M):
        lat.setdefault(pct, []).append(float(v) * unit[u])
    lat = {p: sorted(v)[len(v) // 2] for p, v in lat.items()}
    return rps[len(rps) // 2], n, bad, cpu[0] * tick / n, cpu[1] * tick / n, rounds, lat
def calls(name):
    out = {}
    path = os.path.join(w, name + ".txt")
    for line in open(path) if os.path.exists(path) else []:
        m = re.match(r"cmdstat_(\w+):calls=(\d+),usec=(\d+)", line)
        if m: out[m.group(1)] = int(m.group(2))
        if m and m.group(1) == "evalsha": out["evalsha_usec"] = int(m.group(3))
    return out
labels = [("nginx", "nginx proxy_pass"), ("passthrough", "pingora passthrough"), ("memory", "tollgate memory"), ("nometer", "  … metering off"), ("redis", "tollgate redis")]
res = {n: r for n, _ in labels if (r := wrk(n))}
ngx = res.get("nginx", [0])[0] or float("nan")
pt = res.get("passthrough", [0])[0] or float("nan")
print("CPU µs/request: of the proxy process (nginx: upstream included), and of redis-server")
print("latency in ms (wrk --latency, the median round's): p50 / p90 / p99, and p99 added over the passthrough's")
print(f"{'target':<24}{'req/s':>10}{'vs passthrough':>16}{'vs nginx':>10}{'non-2xx':>9}{'CPU µs/req':>12}{'redis µs/req':>14}{'p50':>8}{'p90':>8}{'p99':>8}{'+p99':>8}")
pt99 = res.get("passthrough", [None] * 7)[6]
pt99 = pt99.get("99") if pt99 else None
for n, label in labels:
    if n not in res:
        continue
    rps, _, bad, cpu, rcpu, _, lat = res[n]
    ms = lambda p: f"{lat[p]:>8.2f}" if p in lat else f"{'-':>8}"
    added = f"{lat['99'] - pt99:>+8.2f}" if pt99 is not None and "99" in lat else f"{'-':>8}"
    print(f"{label:<24}{rps:>10.0f}{rps/pt:>16.2f}{rps/ngx:>10.2f}{bad:>9}{cpu:>12.1f}{rcpu:>14.1f}{ms('50')}{ms('90')}{ms('99')}{added}")
if "memory" in res and "nometer" in res:
    pairs = sorted(a / b for a, b in zip(res["memory"][5], res["nometer"][5]))
    print(f"\nmetering on / off: throughput {res['memory'][0] / res['nometer'][0]:.3f} (medians), "
          f"{pairs[len(pairs) // 2]:.3f} (median of the rounds' pairs: " + ", ".join(f"{p:.3f}" for p in pairs) + "), "
          f"CPU per request {res['memory'][3] / res['nometer'][3]:.3f}")
if "redis" in res:
    known = calls("redis-known")
    n = res["redis"][1]
    scripts = known.get("evalsha", 0) + known.get("eval", 0)
    other = sum(v for k, v in known.items() if k not in ("evalsha", "eval", "evalsha_usec"))
    print(f"\nredis, issued key: {n} requests -> {scripts} EVALSHA round trips ({scripts/n:.3f}/request), "
          f"{known.get('evalsha_usec', 0) / max(scripts, 1):.1f} µs each inside Redis;")
    print(f"  {other} further commands were run inside the scripts or are version polls (not round trips)")
    unk = calls("redis-unknown")
    _, un, *_ = wrk("unknown")
    print(f"redis, unknown key: {un} requests -> {unk.get('hgetall', 0)} HGETALL (the first requests in flight at once each ask), {sum(unk.values())} commands in all")
PY
