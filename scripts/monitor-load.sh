#!/usr/bin/env bash
# Monitoring under saturating load (not a test): mltap serve with default settings in
# front of the canned backend, driven by h2load with gRPC Predict batches of 64 rows ×
# FEATURES float features for MODELS models at once, for DURATION seconds. Samples the
# mltap process's RSS every RSS_EVERY seconds and reports, from /metrics and the
# Anodot files: requests/s, capture drops, exchanges decoded, rows in the files.
#
# Usage: scripts/monitor-load.sh            (DURATION=60 MODELS=3 FEATURES=100 by default)
# Env:   DURATION (s), MODELS, FEATURES, H2_CONNECTIONS (per model), H2_STREAMS,
#        RSS_EVERY (s), BUCKET (default: mltap's default), CONFIG (a mltap.toml, default
#        none: every setting at its default)
# Needs: cargo, h2load (nghttp2-client), python3, curl.
set -euo pipefail
# shellcheck source=scripts/bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"
for tool in h2load python3 curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install -y nghttp2-client)"; exit 2; }
done
DURATION=${DURATION:-60}
MODELS=${MODELS:-3}
FEATURES=${FEATURES:-100}
H2_CONNECTIONS=${H2_CONNECTIONS:-2}
H2_STREAMS=${H2_STREAMS:-32}
RSS_EVERY=${RSS_EVERY:-10}

W=$(mktemp -d)
PIDS=""
cleanup() {
  for pid in $PIDS; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT

echo "building mltap (release) and the canned backend ..."
(cd "$ROOT" && cargo build -q --release)
build_backend

B_GRPC=$(free_port); B_REST=$(free_port); M_GRPC=$(free_port); M_REST=$(free_port); M_ADMIN=$(free_port)

# The backend answers any Predict it has no fixture for with the 64-row, 5-class
# batch response, which matches the 64 rows sent here.
"$BACKEND" "$FIX" "127.0.0.1:$B_GRPC" "127.0.0.1:$B_REST" >/dev/null 2>&1 &
PIDS="$PIDS $!"
BUCKET_FLAG=()
[ -n "${BUCKET:-}" ] && BUCKET_FLAG=(--bucket "$BUCKET")
[ -n "${CONFIG:-}" ] && BUCKET_FLAG+=(--config "$CONFIG")
"$ROOT/target/release/mltap" serve --grpc-listen "127.0.0.1:$M_GRPC" --rest-listen "127.0.0.1:$M_REST" \
  --admin-listen "127.0.0.1:$M_ADMIN" --grpc-upstream "http://127.0.0.1:$B_GRPC" \
  --rest-upstream "http://127.0.0.1:$B_REST" --output-dir "$W/out" --log warn "${BUCKET_FLAG[@]}" 2> "$W/mltap.log" &
MLTAP=$!
PIDS="$PIDS $MLTAP"
for p in $B_GRPC $M_GRPC $M_ADMIN; do wait_port "$p"; done

# One framed PredictRequest per model: x = float [64, FEATURES] as tensor_content,
# hand-encoded protobuf (tensorflow.serving.PredictRequest, wire-compatible).
python3 - "$W" "$MODELS" "$FEATURES" <<'PY'
import random, struct, sys
out, models, features = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def varint(n):
    b = bytearray()
    while True:
        x = n & 0x7F; n >>= 7
        b.append(x | (0x80 if n else 0))
        if not n: return bytes(b)
def field(num, wire, payload):
    key = varint(num << 3 | wire)
    return key + (varint(len(payload)) + payload if wire == 2 else payload)
random.seed(7)
for m in range(models):
    values = [random.gauss(m, 1 + m) for _ in range(64 * features)]
    shape = field(2, 2, field(1, 0, varint(64))) + field(2, 2, field(1, 0, varint(features)))
    tensor = field(1, 0, varint(1)) + field(2, 2, shape) + field(4, 2, struct.pack(f"<{len(values)}f", *values))
    spec = field(1, 2, f"load{m}".encode()) + field(3, 2, b"serving_default")
    request = field(1, 2, spec) + field(2, 2, field(1, 2, b"x") + field(2, 2, tensor))
    open(f"{out}/model{m}.req", "wb").write(struct.pack(">BI", 0, len(request)) + request)
PY

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$MLTAP/status"; }
echo "rss_kib at start: $(rss_kib)"
(
  while kill -0 "$MLTAP" 2>/dev/null; do
    queued=$(curl -s "http://127.0.0.1:$M_ADMIN/metrics" | awk '/^mltap_capture_queue_bytes / {print $2}')
    echo "$(date +%s) $(rss_kib) ${queued:-0}"
    sleep "$RSS_EVERY"
  done
) > "$W/rss.log" &
PIDS="$PIDS $!"

echo "load: $MODELS models × 64 rows × $FEATURES features, ${DURATION}s, $H2_CONNECTIONS connections × $H2_STREAMS streams per model"
H2_PIDS=""
for m in $(seq 0 $((MODELS - 1))); do
  h2load -D "$DURATION" -c "$H2_CONNECTIONS" -m "$H2_STREAMS" -t 1 \
    -H 'content-type: application/grpc' -H 'te: trailers' -d "$W/model$m.req" \
    "http://127.0.0.1:$M_GRPC/tensorflow.serving.PredictionService/Predict" > "$W/h2load.$m" 2>&1 &
  H2_PIDS="$H2_PIDS $!"
done
for pid in $H2_PIDS; do wait "$pid"; done
sleep 2
curl -s "http://127.0.0.1:$M_ADMIN/metrics" > "$W/metrics"

total_rps=0
for m in $(seq 0 $((MODELS - 1))); do
  rps=$(awk '/^finished in/ {gsub(",", "", $4); print $4}' "$W/h2load.$m")
  ok=$(awk '/^status codes:/ {print $3}' "$W/h2load.$m")
  echo "model load$m: $rps req/s, 2xx $ok"
  total_rps=$(python3 -c "print(round($total_rps + float('${rps:-0}' or 0)))")
done
echo "total: $total_rps req/s = $(python3 -c "print(round($total_rps * 64 * $FEATURES / 1e6, 2))") M feature values/s"
grep -E '^mltap_label_(rows_recorded|record_dropped)_total|^mltap_capture_(dropped|skipped_oversize)_total|^mltap_worker_(exchanges_decoded|observations|file_errors)_total|^mltap_capture_queue_depth' "$W/metrics" || true
python3 - "$W/rss.log" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1]) if len(l.split()) == 3]
kib = [int(r[1]) for r in rows]
if kib:
    n = len(kib)
    print(f"rss MiB: first {kib[0]/1024:.1f}, max {max(kib)/1024:.1f}, last {kib[-1]/1024:.1f} "
          f"(samples {n}; second half max {max(kib[n//2:])/1024:.1f})")
    print("rss MiB at each sample: " + " ".join(f"{k/1024:.0f}" for k in kib))
    print("capture queue MiB at each sample: " + " ".join(f"{float(r[2])/2**20:.1f}" for r in rows))
PY

kill -TERM "$MLTAP"
for _ in $(seq 200); do kill -0 "$MLTAP" 2>/dev/null || break; sleep 0.1; done
python3 - "$W/out" <<'PY'
import glob, json, sys
pts = [p for f in glob.glob(f"{sys.argv[1]}/anodot/*/*.json") for p in json.load(open(f))]
rows = sum(p["value"] for p in pts if p["properties"]["what"] == "buffer_count")
dropped = sum(p["value"] for p in pts if p["properties"]["what"] == "capture_dropped")
late = sum(p["value"] for p in pts if p["properties"]["what"] == "late_dropped")
print(f"files: rows {rows:.0f} (= {rows/64:.0f} batches), capture_dropped {dropped:.0f}, late_dropped {late:.0f}, points {len(pts)}")
per_bucket = {}
for p in pts:
    if p["properties"]["what"] == "capture_dropped" and p["value"]:
        per_bucket[p["timestamp"]] = per_bucket.get(p["timestamp"], 0) + p["value"]
if per_bucket:
    print("capture_dropped by bucket start: " + ", ".join(f"{t}: {v:.0f}" for t, v in sorted(per_bucket.items())))
PY
