#!/usr/bin/env bash
# Side-by-side benchmark (not a test) of two `mltap serve` instances behind one canned
# backend: two binaries (a change against its base) or one binary with two sets of
# flags (e.g. fleet mode against a single replica). Interleaved rounds of h2load (gRPC
# Predict, the 64x16 batch) and wrk (REST row-format :predict); prints req/s, p99, CPU
# per request and the ratio B/A per protocol, and each instance's capture counters.
#
# Usage: BIN_A=old/mltap BIN_B=target/release/mltap scripts/bench-ab.sh
#        BIN_A=target/release/mltap BIN_B=target/release/mltap NAME_A=single NAME_B=fleet \
#          ARGS_B="--labels-store redis://127.0.0.1:6379" scripts/bench-ab.sh
# Env:   BIN_A, BIN_B, ARGS_A, ARGS_B, NAME_A, NAME_B, ROUNDS, DURATION, and the load
#        settings of scripts/bench-lib.sh. Needs wrk, h2load, python3, curl.
set -euo pipefail
# shellcheck source=scripts/bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"
load_defaults; scratch_dir; build_backend
NA=${NAME_A:-a}; NB=${NAME_B:-b}
BG=$(free_port); BR=$(free_port)
THREADS=$BACKEND_THREADS "$BACKEND" "$FIX" "127.0.0.1:$BG" "127.0.0.1:$BR" >/dev/null 2>&1 & PIDS="$PIDS $!"
declare -A GP RP AP PID BIN ARGS
BIN[$NA]=$BIN_A; BIN[$NB]=$BIN_B; ARGS[$NA]=${ARGS_A:-}; ARGS[$NB]=${ARGS_B:-}
for which in $NA $NB; do
  GP[$which]=$(free_port); RP[$which]=$(free_port); AP[$which]=$(free_port)
  # shellcheck disable=SC2086
  ${BIN[$which]} serve --grpc-listen 127.0.0.1:${GP[$which]} --rest-listen 127.0.0.1:${RP[$which]} --admin-listen 127.0.0.1:${AP[$which]} \
    --grpc-upstream http://127.0.0.1:$BG --rest-upstream http://127.0.0.1:$BR --output-dir $W/out-$which --log warn ${ARGS[$which]} 2>$W/$which.log &
  PID[$which]=$!; PIDS="$PIDS $!"
done
for p in $BG $BR ${GP[*]} ${RP[*]} ${AP[*]}; do wait_port $p; done
write_payloads
pid_of() { echo ${PID[$1]}; }
echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $ROUNDS rounds x ${DURATION}s"
for round in $(seq $ROUNDS); do
  for which in $NA $NB; do run_grpc $which ${GP[$which]}; run_rest $which ${RP[$which]}; done
done
for proto in grpc rest; do for which in $NA $NB; do k=${proto}_$which
  printf '%-5s %-10s rps %10s p99 %8s cpu/req %8s  (%s)\n' $proto $which "$(median ${RPS[$k]})" "$(median ${P99[$k]})" "$(median ${CPU[$k]})" "${RPS[$k]}"; done
  python3 -c "import sys; a,b=map(float,sys.argv[1:]); print(f'ratio $NB/$NA: {b/a:.3f}')" "$(median ${RPS[${proto}_$NA]})" "$(median ${RPS[${proto}_$NB]})"
done
for which in $NA $NB; do echo "$which: $(curl -s 127.0.0.1:${AP[$which]}/metrics | grep -E '^mltap_capture_(dropped|uncounted)' | tr '\n' ' ')"; grep -B2 -A12 "panicked" $W/$which.log | head -40 || true; done
