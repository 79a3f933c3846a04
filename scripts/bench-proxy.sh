#!/usr/bin/env bash
# Proxy benchmark (not a test): one fast backend behind three paths - direct, nginx as
# a plain proxy, and mltap with capture on - each driven in the same run with h2load
# (gRPC Predict, the 64x16 float batch fixture) and wrk (REST row format). Prints
# requests/s and p99 per path and the ratio mltap/nginx.
#
# The machine is shared and noisy, so the paths are measured in interleaved rounds
# (direct, nginx, mltap, direct, ...) and the median of the rounds is reported, with
# the CPU time each proxy spent per request (from /proc), which noise disturbs less.
#
# Then the latency of nginx and mltap at half of nginx's saturating rate (open loop).
#
# Usage: scripts/bench-proxy.sh      (ROUNDS=3 rounds of DURATION=5 seconds per path)
# Env:   ROUNDS, DURATION (s), WRK_CONNECTIONS, H2_CONNECTIONS, H2_STREAMS, BACKEND_THREADS,
#        LATENCY_CONNECTIONS (REST, 32), LATENCY_H2_CONNECTIONS (gRPC, 4),
#        MLTAP_BIN (the mltap binary measured; default: this tree's release build, built first)
# Needs: cargo, nginx, wrk, h2load (nghttp2-client), python3, curl.
set -euo pipefail
# shellcheck source=scripts/bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"
for tool in nginx wrk h2load python3 curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install -y nginx wrk nghttp2-client)"; exit 2; }
done
load_defaults
scratch_dir

echo "building mltap (release) and the canned backend ..."
MLTAP_BIN=${MLTAP_BIN:-}
if [ -z "$MLTAP_BIN" ]; then (cd "$ROOT" && cargo build -q --release); MLTAP_BIN=$ROOT/target/release/mltap; fi
build_backend

B_GRPC=$(free_port); B_REST=$(free_port); N_GRPC=$(free_port); N_REST=$(free_port)
M_GRPC=$(free_port); M_REST=$(free_port); M_ADMIN=$(free_port)

# Backend: answers the recorded fixtures.
THREADS=$BACKEND_THREADS "$BACKEND" "$FIX" "127.0.0.1:$B_GRPC" "127.0.0.1:$B_REST" >/dev/null 2>&1 &
BACKEND_PID=$!
PIDS="$PIDS $BACKEND_PID"

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
  # Default 1000: nginx would close each benchmark connection after 1000 requests.
  keepalive_requests 10000000;
  client_body_temp_path $W/nginx/tmp/body;
  proxy_temp_path $W/nginx/tmp/proxy;
  fastcgi_temp_path $W/nginx/tmp/fastcgi;
  uwsgi_temp_path $W/nginx/tmp/uwsgi;
  scgi_temp_path $W/nginx/tmp/scgi;
  upstream rest_backend { server 127.0.0.1:$B_REST; keepalive 128; keepalive_requests 10000000; }
  upstream grpc_backend { server 127.0.0.1:$B_GRPC; keepalive 128; keepalive_requests 10000000; }
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
NGINX_PID=$!
PIDS="$PIDS $NGINX_PID"

# mltap with capture on (every Predict/Classify/Regress is copied to the worker, or
# counted only when the worker sheds statistics under load).
"$MLTAP_BIN" serve --grpc-listen "127.0.0.1:$M_GRPC" --rest-listen "127.0.0.1:$M_REST" \
  --admin-listen "127.0.0.1:$M_ADMIN" --grpc-upstream "http://127.0.0.1:$B_GRPC" \
  --rest-upstream "http://127.0.0.1:$B_REST" --output-dir "$W/mltap-out" --log warn 2> "$W/mltap.log" &
MLTAP_PID=$!
PIDS="$PIDS $MLTAP_PID"
for p in $B_GRPC $B_REST $N_GRPC $N_REST $M_GRPC $M_REST $M_ADMIN; do wait_port "$p"; done

write_payloads

# Sanity: every path answers the same bytes before it is measured.
for port in $B_REST $N_REST $M_REST; do
  curl -s -X POST --data-binary @"$FIX/rest/$REST_CASE.request.json" "http://127.0.0.1:$port$REST_PATH" > "$W/rest.$port"
done
cmp -s "$W/rest.$B_REST" "$W/rest.$N_REST" && cmp -s "$W/rest.$B_REST" "$W/rest.$M_REST" || { echo "REST answers differ"; exit 1; }

pid_of() { case $1 in direct) echo "$BACKEND_PID" ;; nginx) echo "$NGINX_PID" ;; mltap) echo "$MLTAP_PID" ;; esac; }

echo "machine: $(nproc) cores, $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg); $ROUNDS rounds x ${DURATION}s per path"
for round in $(seq "$ROUNDS"); do
  for name in direct nginx mltap; do
    case $name in direct) rp=$B_REST gp=$B_GRPC ;; nginx) rp=$N_REST gp=$N_GRPC ;; mltap) rp=$M_REST gp=$M_GRPC ;; esac
    run_rest $name "$rp"
    run_grpc $name "$gp"
  done
  echo "round $round done"
done

printf '\n%-6s %-7s %12s %10s %14s   %s\n' proto path 'req/s' 'p99 ms' 'cpu us/req' '(rounds: req/s)'
for proto in grpc rest; do
  for name in direct nginx mltap; do
    k=${proto}_$name
    # shellcheck disable=SC2086
    printf '%-6s %-7s %12s %10s %14s   %s\n' "$proto" "$name" "$(median ${RPS[$k]})" "$(median ${P99[$k]})" "$(median ${CPU[$k]})" "${RPS[$k]}"
  done
done
echo
for proto in grpc rest; do
  # shellcheck disable=SC2086
  python3 -c "import sys; m,n,pm,pn,cm,cn=map(float,sys.argv[2:]); print(f'{sys.argv[1]}: mltap/nginx throughput {m/n:.2f} (target >= 1.2); p99 mltap {pm:.2f} ms vs nginx {pn:.2f} ms; cpu per request mltap {cm:.1f} us vs nginx {cn:.1f} us')" \
    "$proto" "$(median ${RPS[${proto}_mltap]})" "$(median ${RPS[${proto}_nginx]})" "$(median ${P99[${proto}_mltap]})" \
    "$(median ${P99[${proto}_nginx]})" "$(median ${CPU[${proto}_mltap]})" "$(median ${CPU[${proto}_nginx]})"
done

# Latency at half of nginx's saturating rate, measured above: an open-loop load (h2load
# sends at a fixed rate whatever the answers' speed, as independent clients do) of
# nginx's median req/s / 2 per protocol, nginx and mltap alternately in the same
# rounds. REST over LATENCY_CONNECTIONS HTTP/1.1 connections, gRPC over
# LATENCY_H2_CONNECTIONS connections; p50 and p99 of every answered request.
LATENCY_CONNECTIONS=${LATENCY_CONNECTIONS:-32}
LATENCY_H2_CONNECTIONS=${LATENCY_H2_CONNECTIONS:-4}
declare -A LAT50 LAT99 RATE
for proto in grpc rest; do
  # shellcheck disable=SC2086
  RATE[$proto]=$(python3 -c "import sys; print(int(float(sys.argv[1]) / 2))" "$(median ${RPS[${proto}_nginx]})")
done
latency_percentiles() { # log -> "p50 p99" in microseconds, of the 200 answers
  python3 - "$1" <<'PY'
import sys
ok = sorted(int(l.split()[2]) for l in open(sys.argv[1]) if l.strip() and l.split()[1] == "200")
q = lambda p: ok[min(len(ok) - 1, int(len(ok) * p))] if ok else float("nan")
print(q(0.5), q(0.99))
PY
}
latency_run() { # proto name port
  local connections streams=1 path=$REST_PATH data=$FIX/rest/$REST_CASE.request.json p50 p99
  local -a proto_args=(--h1 -H 'content-type: application/json')
  connections=$LATENCY_CONNECTIONS
  if [ "$1" = grpc ]; then
    connections=$LATENCY_H2_CONNECTIONS streams=32 path=/tensorflow.serving.PredictionService/Predict data=$W/grpc.req
    proto_args=(-H 'content-type: application/grpc' -H 'te: trailers')
  fi
  rm -f "$W/lat.log"
  h2load -D "$DURATION" -c "$connections" -m "$streams" -t 1 --rps $(( ${RATE[$1]} / connections )) "${proto_args[@]}" \
    -d "$data" --log-file="$W/lat.log" "http://127.0.0.1:$3$path" >/dev/null
  read -r p50 p99 <<<"$(latency_percentiles "$W/lat.log")"
  LAT50[$1_$2]="${LAT50[$1_$2]:-} $p50"
  LAT99[$1_$2]="${LAT99[$1_$2]:-} $p99"
}
for round in $(seq "$ROUNDS"); do
  for name in nginx mltap; do
    case $name in nginx) rp=$N_REST gp=$N_GRPC ;; mltap) rp=$M_REST gp=$M_GRPC ;; esac
    latency_run rest $name "$rp"
    latency_run grpc $name "$gp"
  done
done
echo
echo "latency at half of nginx's saturating rate (open loop: gRPC ${RATE[grpc]} req/s over $LATENCY_H2_CONNECTIONS connections, REST ${RATE[rest]} req/s over $LATENCY_CONNECTIONS connections; median of $ROUNDS rounds):"
for proto in grpc rest; do
  # shellcheck disable=SC2086
  python3 -c "import sys; a,b,c,d=map(float,sys.argv[2:]); print(f'{sys.argv[1]}: p50 mltap {c:.0f} us vs nginx {a:.0f} us (+{c-a:.0f}); p99 mltap {d:.0f} us vs nginx {b:.0f} us (+{d-b:.0f}); target: within +100 us')" \
    "$proto" "$(median ${LAT50[${proto}_nginx]})" "$(median ${LAT99[${proto}_nginx]})" "$(median ${LAT50[${proto}_mltap]})" "$(median ${LAT99[${proto}_mltap]})"
done
echo
echo "mltap capture (from /metrics):"
curl -s "http://127.0.0.1:$M_ADMIN/metrics" | grep -E '^mltap_(capture_(dropped|skipped_oversize|enqueued|count_enqueued|uncounted)_total|worker_exchanges_received_total)' || true
