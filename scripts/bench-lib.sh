# Sourced by the load scripts: the repository's fixtures, the canned backend built
# from tools/canned-backend (a TF-Serving-shaped server answering the fixtures), and
# the port helpers. Env: MLTAP_FIXTURES, MLTAP_BENCH_TARGET (the backend's build dir).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FIX=${MLTAP_FIXTURES:-$ROOT/tests/fixtures/tfserving}
BENCH_TARGET=${MLTAP_BENCH_TARGET:-${XDG_CACHE_HOME:-$HOME/.cache}/mltap-bench}
BACKEND=$BENCH_TARGET/release/canned-backend

build_backend() {
  CARGO_TARGET_DIR=$BENCH_TARGET cargo build -q --release --manifest-path "$ROOT/tools/canned-backend/Cargo.toml"
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 did not open"; exit 1; }

# The load settings the comparison scripts share, each overridable from the env.
load_defaults() {
  DURATION=${DURATION:-5}
  ROUNDS=${ROUNDS:-3}
  WRK_CONNECTIONS=${WRK_CONNECTIONS:-64}
  H2_CONNECTIONS=${H2_CONNECTIONS:-4}
  H2_STREAMS=${H2_STREAMS:-32}
  BACKEND_THREADS=${BACKEND_THREADS:-1}
}
# A scratch dir W, removed at exit with every process listed in PIDS.
scratch_dir() {
  W=$(mktemp -d)
  PIDS=""
  trap cleanup EXIT
}
cleanup() {
  for pid in ${PIDS:-}; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$W"
}

# Payloads in W: grpc.req (the 64x16 gRPC fixture framed with the 5-byte prefix) and
# post.lua (wrk's POST of the REST row-format body); sets REST_CASE and REST_PATH.
write_payloads() {
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
}

# The measurement of one path, shared by the load scripts. Each script defines
# pid_of NAME (the process whose CPU is charged) and sets W, REST_PATH, DURATION,
# WRK_CONNECTIONS, H2_CONNECTIONS and H2_STREAMS; W holds post.lua and grpc.req.
declare -A RPS P99 CPU
# CPU ticks (user + system) of a process and its children processes (nginx workers).
ticks() {
  local total=0 pid
  for pid in "$1" $(pgrep -P "$1" || true); do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
  done
  echo "$total"
}
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
median() { python3 -c "import statistics,sys; print(f'{statistics.median(map(float, sys.argv[1:])):.2f}')" "$@"; }
