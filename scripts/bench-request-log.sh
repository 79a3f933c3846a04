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
# Env:   ROUNDS, DURATION (s), WRK_CONNECTIONS, H2_CONNECTIONS, H2_STREAMS, BACKEND_THREADS
# Needs: cargo, wrk, h2load (nghttp2-client), python3, curl.
set -euo pipefail
# shellcheck source=scripts/bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"
for tool in wrk h2load python3 curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install -y wrk nghttp2-client)"; exit 2; }
done
load_defaults
scratch_dir

echo "building mltap (release) and the canned backend ..."
(cd "$ROOT" && cargo build -q --release)
build_backend

B_GRPC=$(free_port); B_REST=$(free_port)
OFF_GRPC=$(free_port); OFF_REST=$(free_port); OFF_ADMIN=$(free_port)
ON_GRPC=$(free_port); ON_REST=$(free_port); ON_ADMIN=$(free_port)

# Backend: answers the recorded fixtures.
THREADS=$BACKEND_THREADS "$BACKEND" "$FIX" "127.0.0.1:$B_GRPC" "127.0.0.1:$B_REST" >/dev/null 2>&1 &
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

write_payloads

pid_of() { case $1 in off) echo "$OFF_PID" ;; on) echo "$ON_PID" ;; esac; }

echo "machine: $(nproc) cores, $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg); $ROUNDS rounds x ${DURATION}s per instance"
for round in $(seq "$ROUNDS"); do
  for name in off on; do
    case $name in off) rp=$OFF_REST gp=$OFF_GRPC ;; on) rp=$ON_REST gp=$ON_GRPC ;; esac
    run_rest $name "$rp"
    run_grpc $name "$gp"
  done
  echo "round $round done"
done

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
