# Helpers the benchmark scripts share; sourced, not run.

# A port nothing listens on now.
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits up to 30 s for 127.0.0.1:$1 to accept (valgrind starts slowly).
wait_port() { for _ in $(seq 1 300); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

# The plan every keyed load runs on: limits that never refuse, one meter.
bench_plans() {
  cat > "$1" <<'PLANS'
default_plan: pro
plans:
  pro:
    limits:
      - { name: burst, requests: 100000000, per: second }
      - { name: monthly, requests: 1000000000000, per: month }
    meter: api_requests
PLANS
}

# Writes $1/nginx.conf: one worker answering 200 itself on port $2 (the
# upstream every target proxies to), plus whatever more `http` lines $3 has.
nginx_conf() {
  mkdir -p "$1"
  cat > "$1/nginx.conf" <<NGX
worker_processes 1;
daemon off;
master_process off;
pid $1/nginx.pid;
error_log stderr error;
events { worker_connections 4096; }
http {
  access_log off;
  server { listen 127.0.0.1:$2; location / { return 200 "ok\n"; } }
  ${3:-}
}
NGX
}
