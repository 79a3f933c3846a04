#!/usr/bin/env bash
# Request log benchmark (not a test): what logging every exchange costs. Two mltap
# instances in front of one fast backend, identical but for [request_log]
# sampling_rate (0 = off, 1.0 = every Predict logged as a PredictionLog TFRecord),
# driven in interleaved rounds with wrk (REST row format) and h2load (gRPC Predict,
# the 64x16 float batch fixture). Prints req/s, p99 and CPU per request of each, the
# ratio on/off (the target: logging 100 % costs < 15 % of throughput, ratio >= 0.85)
# and the request log's own counts, so that records dropped for a full buffer cannot
# pass for speed.
#
# Usage: scripts/bench-request-log.sh      (ROUNDS=3 rounds of DURATION=5 seconds per instance)
# Env:   ROUNDS, DURATION (s), WRK_CONNECTIONS, H2_CONNECTIONS, H2_STREAMS, BACKEND_THREADS,
#        MLTAP_SHARED (the shared dir holding fixtures/ and tools/; default ../shared)
# Needs: cargo, wrk, h2load (nghttp2-client), python3, curl.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${MLTAP_SHARED:-}
if [ -z "$SHARED" ]; then
  for candidate in "$ROOT/../shared" "$ROOT/../../shared"; do
    if [ -d "$candidate/fixtures/tfserving" ]; then SHARED=$(cd "$candidate" && pwd); break; fi
  done
fi
[ -n "$SHARED" ] || { echo "shared dir not found: set MLTAP_SHARED"; exit 2; }
for tool in wrk h2load python3 curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install -y wrk nghttp2-client)"; exit 2; }
done
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
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
B_GRPC=$(free_port); B_REST=$(free_port)
OFF_GRPC=$(free_port); OFF_REST=$(free_port); OFF_ADMIN=$(free_port)
ON_GRPC=$(free_port); ON_REST=$(free_port); ON_ADMIN=$(free_port)

# Backend: answers the recorded fixtures.
THREADS=$BACKEND_THREADS "$BENCH_TARGET/release/canned-backend" "$FIX" "127.0.0.1:$B_GRPC" "127.0.0.1:$B_REST" >/dev/null 2>&1 &
BACKEND_PID=$!
PIDS="$PIDS $BACKEND_PID"

# The two instances; the request log of the second writes to a dir of its own.
cat > "$W/on.toml" <<TOML
[request_log]
sampling_rate = 1.0
dir = "$W/requests"
TOML
: > "$W/off.toml"
for which in off on; do
  case $which in off) g=$OFF_GRPC r=$OFF_REST a=$OFF_ADMIN ;; on) g=$ON_GRPC r=$ON_REST a=$ON_ADMIN ;; esac
  "$ROOT/target/release/mltap" serve --config "$W/$which.toml" --grpc-listen "127.0.0.1:$g" --rest-listen "127.0.0.1:$r" \
    --admin-listen "127.0.0.1:$a" --grpc-upstream "http://127.0.0.1:$B_GRPC" \
    --rest-upstream "http://127.0.0.1:$B_REST" --output-dir "$W/out-$which" --log warn 2> "$W/mltap-$which.log" &
  case $which in off) OFF_PID=$! ;; on) ON_PID=$! ;; esac
  PIDS="$PIDS $!"
done
for p in $B_GRPC $B_REST $OFF_GRPC $OFF_REST $OFF_ADMIN $ON_GRPC $ON_REST $ON_ADMIN; do wait_port "$p"; done

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

declare -A RPS P99 CPU
# CPU ticks (user + system) of a process and its children processes (nginx workers).
ticks() {
  local total=0 pid
  for pid in "$1" $(pgrep -P "$1" || true); do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
  done
  echo "$total"
}
pid_of() { case $1 in off) echo "$OFF_PID" ;; on) echo "$ON_PID" ;; esac; }
# Appends one round's req/s, p99 (ms) and CPU microseconds per request of the path.
record() { # key rps p99 ticks_before ticks_after requests
  RPS[$1]="${RPS[$1]:-} $2"
  P99[$1]="${P99[$1]:-} $3"
  CPU[$1]="${CPU[$1]:-} $(python3 -c "import os,sys; t,n=float(sys.argv[1]),float(sys.argv[2]); print(f'{t * 1e6 / os.sysconf(\"SC_CLK_TCK\") / max(n, 1):.1f}')" "$(( $5 - $4 ))" "$6")"
}
run_rest() { # name port
  local out before after rps
  before=$(ticks "$(pid_of "$1")")
  out=$(wrk -t 2 -c "$WRK_CONNECTIONS" -d "${DURATION}s" --latency -s "$W/post.lua" "http://127.0.0.1:$2$REST_PATH")
  after=$(ticks "$(pid_of "$1")")
  grep -q "Non-2xx" <<<"$out" && { echo "rest $1: non-2xx answers"; echo "$out"; exit 1; }
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  record "rest_$1" "$rps" "$(awk '$1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us$/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v=v*1000}; print v}' <<<"$out")" \
    "$before" "$after" "$(awk '/requests in/ {print $1}' <<<"$out")"
}
run_grpc() { # name port
  local out before after stats
  rm -f "$W/h2.log"
  before=$(ticks "$(pid_of "$1")")
  out=$(h2load -D "$DURATION" -c "$H2_CONNECTIONS" -m "$H2_STREAMS" -t 1 \
    -H 'content-type: application/grpc' -H 'te: trailers' -d "$W/grpc.req" --log-file="$W/h2.log" \
    "http://127.0.0.1:$2/tensorflow.serving.PredictionService/Predict")
  after=$(ticks "$(pid_of "$1")")
  grep -q " 0 failed, 0 errored" <<<"$out" || { echo "grpc $1: failures"; echo "$out"; exit 1; }
  # h2load's log: start time, status, duration (us) per request; p99 from it.
  stats=$(python3 - "$W/h2.log" "$DURATION" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
ok = sorted(int(r[2]) for r in rows if r[1] == "200")
p99 = ok[min(len(ok) - 1, int(len(ok) * 0.99))] / 1000 if ok else float("nan")
print(f"{len(ok) / float(sys.argv[2]):.0f} {p99:.2f} {len(rows)}")
PY
)
  read -r rps p99 n <<<"$stats"
  record "grpc_$1" "$rps" "$p99" "$before" "$after" "$n"
}

echo "machine: $(nproc) cores, $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg); $ROUNDS rounds x ${DURATION}s per instance"
for round in $(seq "$ROUNDS"); do
  for name in off on; do
    case $name in off) rp=$OFF_REST gp=$OFF_GRPC ;; on) rp=$ON_REST gp=$ON_GRPC ;; esac
    run_rest $name "$rp"
    run_grpc $name "$gp"
  done
  echo "round $round done"
done

median() { python3 -c "import statistics,sys; print(f'{statistics.median(map(float, sys.argv[1:])):.2f}')" "$@"; }
printf '\n%-6s %-12s %12s %10s %14s   %s\n' proto 'request log' 'req/s' 'p99 ms' 'cpu us/req' '(rounds: req/s)'
for proto in grpc rest; do
  for name in off on; do
    k=${proto}_$name
    # shellcheck disable=SC2086
    printf '%-6s %-12s %12s %10s %14s   %s\n' "$proto" "$name" "$(median ${RPS[$k]})" "$(median ${P99[$k]})" "$(median ${CPU[$k]})" "${RPS[$k]}"
  done
done
echo
for proto in grpc rest; do
  # shellcheck disable=SC2086
  python3 -c "import sys; a,b,pa,pb=map(float,sys.argv[2:]); print(f'{sys.argv[1]}: throughput with logging 100 % / off {a/b:.2f} (target >= 0.85); p99 {pa:.2f} ms vs {pb:.2f} ms')" \
    "$proto" "$(median ${RPS[${proto}_on]})" "$(median ${RPS[${proto}_off]})" "$(median ${P99[${proto}_on]})" "$(median ${P99[${proto}_off]})"
done
echo
echo "request log (from /metrics of the instance logging 100 %; any dropped_* outcome means records were lost):"
curl -s "http://127.0.0.1:$ON_ADMIN/metrics" | grep -E '^mltap_request_log_' || true
du -sh "$W/requests" 2>/dev/null || true
