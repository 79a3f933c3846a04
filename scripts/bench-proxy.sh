#!/usr/bin/env bash
# Proxy benchmark (not a test): one fast backend behind three paths - direct, nginx as
# a plain proxy, and mltap with capture on - each driven in the same run with h2load
# (gRPC Predict, the 64x16 float batch fixture) and wrk (REST row format). Prints
# requests/s and p99 per path and the ratio mltap/nginx.
#
# Usage: scripts/bench-proxy.sh            (DURATION=10 seconds per path by default)
# Env:   DURATION (s), WRK_CONNECTIONS, H2_CONNECTIONS, H2_STREAMS, BACKEND_THREADS,
#        MLTAP_SHARED (the shared dir holding fixtures/ and tools/; default ../shared)
# Needs: cargo, nginx, wrk, h2load (nghttp2-client), python3, curl.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${MLTAP_SHARED:-}
if [ -z "$SHARED" ]; then
  for candidate in "$ROOT/../shared" "$ROOT/../../shared"; do
    if [ -d "$candidate/fixtures/tfserving" ]; then SHARED=$(cd "$candidate" && pwd); break; fi
  done
fi
[ -n "$SHARED" ] || { echo "shared dir not found: set MLTAP_SHARED"; exit 2; }
for tool in nginx wrk h2load python3 curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install -y nginx wrk nghttp2-client)"; exit 2; }
done
DURATION=${DURATION:-10}
WRK_CONNECTIONS=${WRK_CONNECTIONS:-64}
H2_CONNECTIONS=${H2_CONNECTIONS:-4}
H2_STREAMS=${H2_STREAMS:-32}
BACKEND_THREADS=${BACKEND_THREADS:-1}
FIX=$SHARED/fixtures/tfserving
BENCH_TARGET=${MLTAP_BENCH_TARGET:-${XDG_CACHE_HOME:-$HOME/.cache}/mltap-bench}

W=$(mktemp -d)
cleanup() {
  for pid in ${PIDS:-}; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
PIDS=""

echo "building mltap (release) and the canned backend ..."
(cd "$ROOT" && cargo build -q --release)
CARGO_TARGET_DIR=$BENCH_TARGET cargo build -q --release --manifest-path "$SHARED/tools/canned-backend/Cargo.toml"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 did not open"; exit 1; }
B_GRPC=$(free_port); B_REST=$(free_port); N_GRPC=$(free_port); N_REST=$(free_port)
M_GRPC=$(free_port); M_REST=$(free_port); M_ADMIN=$(free_port)

# Backend: answers the recorded fixtures.
THREADS=$BACKEND_THREADS "$BENCH_TARGET/release/canned-backend" "$FIX" "127.0.0.1:$B_GRPC" "127.0.0.1:$B_REST" >/dev/null 2>&1 &
PIDS="$PIDS $!"

# nginx: plain proxy, upstream keepalive, grpc_pass for gRPC.
mkdir -p "$W/nginx/tmp"
cat > "$W/nginx/nginx.conf" <<NGINX
user $(id -un);
worker_processes auto;
daemon off;
pid $W/nginx/nginx.pid;
error_log $W/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $W/nginx/tmp/body;
  proxy_temp_path $W/nginx/tmp/proxy;
  fastcgi_temp_path $W/nginx/tmp/fastcgi;
  uwsgi_temp_path $W/nginx/tmp/uwsgi;
  scgi_temp_path $W/nginx/tmp/scgi;
  upstream rest_backend { server 127.0.0.1:$B_REST; keepalive 128; }
  upstream grpc_backend { server 127.0.0.1:$B_GRPC; keepalive 128; }
  server {
    listen 127.0.0.1:$N_REST;
    location / {
      proxy_pass http://rest_backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
  server {
    listen 127.0.0.1:$N_GRPC http2;
    location / { grpc_pass grpc://grpc_backend; }
  }
}
NGINX
nginx -p "$W/nginx" -c "$W/nginx/nginx.conf" -e "$W/nginx/error.log" &
PIDS="$PIDS $!"

# mltap with capture on (every Predict/Classify/Regress is copied to the worker).
"$ROOT/target/release/mltap" serve --grpc-listen "127.0.0.1:$M_GRPC" --rest-listen "127.0.0.1:$M_REST" \
  --admin-listen "127.0.0.1:$M_ADMIN" --grpc-upstream "http://127.0.0.1:$B_GRPC" \
  --rest-upstream "http://127.0.0.1:$B_REST" --output-dir "$W/mltap-out" --log warn 2> "$W/mltap.log" &
PIDS="$PIDS $!"
for p in $B_GRPC $B_REST $N_GRPC $N_REST $M_GRPC $M_REST $M_ADMIN; do wait_port "$p"; done

# Payloads: the gRPC fixture framed with the 5-byte prefix; the REST row-format body.
python3 -c "import struct,sys;p=open(sys.argv[1],'rb').read();sys.stdout.buffer.write(struct.pack('>BI',0,len(p))+p)" \
  "$FIX/grpc/batch64x16.request.pb" > "$W/grpc.req"
REST_CASE=row_single_input
REST_PATH=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['path'])" "$FIX/rest/$REST_CASE.expected.json")
cat > "$W/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("$FIX/rest/$REST_CASE.request.json", "rb")
wrk.body = f:read("*a")
f:close()
LUA

# Sanity: every path answers the same bytes before it is measured.
for port in $B_REST $N_REST $M_REST; do
  curl -s -X POST --data-binary @"$FIX/rest/$REST_CASE.request.json" "http://127.0.0.1:$port$REST_PATH" > "$W/rest.$port"
done
cmp -s "$W/rest.$B_REST" "$W/rest.$N_REST" && cmp -s "$W/rest.$B_REST" "$W/rest.$M_REST" || { echo "REST answers differ"; exit 1; }

declare -A RPS P99
run_rest() { # name port
  local out
  out=$(wrk -t 2 -c "$WRK_CONNECTIONS" -d "${DURATION}s" --latency -s "$W/post.lua" "http://127.0.0.1:$2$REST_PATH")
  RPS[rest_$1]=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  P99[rest_$1]=$(awk '$1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us$/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v=v*1000}; print v}' <<<"$out")
  grep -q "Non-2xx" <<<"$out" && { echo "rest $1: non-2xx answers"; echo "$out"; exit 1; } || true
}
run_grpc() { # name port
  local out
  rm -f "$W/h2.log"
  out=$(h2load -D "$DURATION" --warm-up-time=1 -c "$H2_CONNECTIONS" -m "$H2_STREAMS" -t 1 \
    -H 'content-type: application/grpc' -H 'te: trailers' -d "$W/grpc.req" --log-file="$W/h2.log" \
    "http://127.0.0.1:$2/tensorflow.serving.PredictionService/Predict")
  RPS[grpc_$1]=$(python3 - "$W/h2.log" "$DURATION" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
ok = [r for r in rows if r[1] == "200"]
print(f"{len(ok) / float(sys.argv[2]):.0f}")
PY
)
  P99[grpc_$1]=$(python3 - "$W/h2.log" <<'PY'
import sys
d = sorted(int(l.split()[2]) for l in open(sys.argv[1]) if l.strip())
print(f"{d[min(len(d) - 1, int(len(d) * 0.99))] / 1000:.2f}" if d else "nan")
PY
)
  grep -q "0 failed, 0 errored" <<<"$out" || { echo "grpc $1: failures"; echo "$out"; exit 1; }
}

echo "machine: $(nproc) cores, $(uname -r); ${DURATION}s per path"
for name in direct nginx mltap; do
  case $name in direct) rp=$B_REST gp=$B_GRPC ;; nginx) rp=$N_REST gp=$N_GRPC ;; mltap) rp=$M_REST gp=$M_GRPC ;; esac
  run_rest $name "$rp"
  run_grpc $name "$gp"
done

printf '\n%-6s %-7s %12s %10s\n' proto path 'req/s' 'p99 ms'
for proto in grpc rest; do
  for name in direct nginx mltap; do
    printf '%-6s %-7s %12s %10s\n' "$proto" "$name" "${RPS[${proto}_$name]}" "${P99[${proto}_$name]}"
  done
done
echo
for proto in grpc rest; do
  python3 -c "import sys; m,n,pm,pn=map(float,sys.argv[2:]); print(f'{sys.argv[1]}: mltap/nginx throughput {m/n:.2f} (target >= 1.2), p99 mltap {pm:.2f} ms vs nginx {pn:.2f} ms')" \
    "$proto" "${RPS[${proto}_mltap]}" "${RPS[${proto}_nginx]}" "${P99[${proto}_mltap]}" "${P99[${proto}_nginx]}"
done
echo
echo "mltap capture (from /metrics):"
curl -s "http://127.0.0.1:$M_ADMIN/metrics" | grep -E '^mltap_(capture_(dropped|skipped_oversize|enqueued)_total|worker_exchanges_received_total)' || true
