#!/usr/bin/env bash
# Time inside Redis of one limiter script call, without the proxy: loads the
# script from proxy/redis/src/limiter.lua into a redis-server of its own and
# runs it for one customer with a sliding second and a calendar month, as
# the proxy would under load (a new millisecond every few calls), reporting
# µs per call from INFO commandstats.
#
#   benches/redis_script.sh [requests per call=8] [calls=5000]
set -euo pipefail
cd "$(dirname "$0")/.."
per=${1:-8}
calls=${2:-5000}
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" >/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
python3 - "$per" "$calls" > "$work/calls.txt" <<'PY'
import hashlib, re, sys, time
per, calls = int(sys.argv[1]), int(sys.argv[2])
script = open("proxy/redis/src/limiter.lua").read()
now = int(time.time() * 1000)
def cmd(*args):
    out = f"*{len(args)}\r\n"
    for a in args:
        a = str(a)
        out += f"${len(a.encode())}\r\n{a}\r\n"
    return out
keys = ["{b:cus}:s:burst:1000", "{b:cus}:s:burst:1000:t", "{b:cus}:c:monthly:0"]
sha = hashlib.sha1(script.encode()).hexdigest()
lines = [cmd("SCRIPT", "LOAD", script)]
for i in range(calls):
    args = ["inst", now + i // 4, i, 1, 2, "s", 1000, 10**8, 0, "c", 10**14, 10**12, 0, per] + [1] * per
    lines.append(cmd("EVALSHA", sha, len(keys), *keys, *args))
sys.stdout.write("".join(lines))
PY
redis-cli -p "$port" config resetstat >/dev/null
redis-cli -p "$port" --pipe < "$work/calls.txt" >/dev/null
redis-cli -p "$port" info commandstats | python3 -c '
import re, sys
for line in sys.stdin:
    m = re.match(r"cmdstat_(\w+):calls=(\d+),usec=(\d+)", line)
    if m and m.group(1) == "evalsha":
        calls, usec = int(m.group(2)), int(m.group(3))
        print(f"{calls} script calls of '"$per"' requests: {usec / calls:.1f} µs per call inside Redis, {usec / calls / '"$per"':.2f} µs per request")'
