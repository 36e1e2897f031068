#!/usr/bin/env bash
# One command: build Tollgate, start the example VAT API behind it on the
# embedded default (file keys, in-memory limits), create a fresh key and
# print a curl that works. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh

echo "building tollgate (first build takes a few minutes)..." >&2
cargo build --release --quiet -p tollgate
bin=target/release/tollgate
config=examples/tollgate.yaml
export TOLLGATE_ADMIN_TOKEN="${TOLLGATE_ADMIN_TOKEN:-$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
# The example keeps its key store and spool under data/ (git-ignored).
mkdir -p data

"$bin" -c "$config" check

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT INT TERM

python3 examples/vat_api.py --port 8000 &
pids+=($!)
for _ in $(seq 1 50); do
  curl -s -o /dev/null http://127.0.0.1:8000/health && break
  sleep 0.1
done
RUST_LOG="${RUST_LOG:-warn}" "$bin" -c "$config" run &
pids+=($!)

for _ in $(seq 1 100); do
  curl -s -o /dev/null http://127.0.0.1:8080/health && break
  sleep 0.1
done

key=$("$bin" -c "$config" keys create --customer cus_demo --name "demo key")
cat <<MSG

Tollgate is running on http://127.0.0.1:8080 in front of the example API on :8000.
A fresh key for customer cus_demo (plan free: 5 requests/second, 100/day):

  curl -i -H "Authorization: Bearer $key" http://127.0.0.1:8080/v1/vat/DE136695976

Run it a few times and watch X-RateLimit-Remaining count down; the 6th call
within a second gets a 429 with Retry-After.

Your consumers' dashboard (paste the key there to see plan, limits, usage):

  http://127.0.0.1:8080/_tollgate/

and the docs they read (generated from plans.yaml; \`tollgate docs --out site\` writes them to files):

  http://127.0.0.1:8080/_tollgate/docs

Also try:

  curl -s -H "Authorization: Bearer $key" http://127.0.0.1:8080/_tollgate/usage
  curl -s -X POST -H "Authorization: Bearer $key" -d '{"text":"a long text to summarise"}' http://127.0.0.1:8080/v1/ai/summarize
  curl -s http://127.0.0.1:9090/metrics | grep tollgate_requests_total
  tail -f data/access.log        # one JSON line per request
  TOLLGATE_ADMIN_TOKEN=$TOLLGATE_ADMIN_TOKEN $bin -c $config usage

Press Ctrl-C to stop.
MSG
wait
