#!/usr/bin/env bash
# Exact counts under overload (not a test; tests/exact_counts.rs is the small-scale
# test): `mltap serve` with a capture queue far too small for the load (QUEUE
# exchanges), in front of the canned backend, takes REQUESTS gRPC Predict calls of
# the 64-row fixture from h2load at full speed; after a graceful stop, the Anodot
# files' request_count must sum to REQUESTS and prediction_count to 64 x REQUESTS,
# while sampled_fraction shows how much of the traffic the statistics saw.
#
# Usage: scripts/exact-counts.sh      Env: REQUESTS (20000), QUEUE (2).
# Needs: cargo, h2load (nghttp2-client), python3.
set -euo pipefail
# shellcheck source=scripts/bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"
command -v h2load >/dev/null || { echo "missing h2load (apt-get install -y nghttp2-client)"; exit 2; }
REQUESTS=${REQUESTS:-20000}
QUEUE=${QUEUE:-2}
W=$(mktemp -d)
PIDS=""
trap 'for p in $PIDS; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"' EXIT
(cd "$ROOT" && cargo build -q --release)
build_backend
B_GRPC=$(free_port); B_REST=$(free_port); M_GRPC=$(free_port); M_REST=$(free_port); M_ADMIN=$(free_port)
"$BACKEND" "$FIX" "127.0.0.1:$B_GRPC" "127.0.0.1:$B_REST" >/dev/null 2>&1 &
PIDS="$PIDS $!"
printf '[capture]\nqueue_exchanges = %s\n' "$QUEUE" > "$W/mltap.toml"
"$ROOT/target/release/mltap" serve --config "$W/mltap.toml" --grpc-listen "127.0.0.1:$M_GRPC" \
  --rest-listen "127.0.0.1:$M_REST" --admin-listen "127.0.0.1:$M_ADMIN" \
  --grpc-upstream "http://127.0.0.1:$B_GRPC" --rest-upstream "http://127.0.0.1:$B_REST" \
  --output-dir "$W/out" --bucket 2s --log warn 2> "$W/mltap.log" &
MLTAP_PID=$!
for p in $B_GRPC $M_GRPC $M_ADMIN; do wait_port "$p"; done
python3 -c "import struct,sys;p=open(sys.argv[1],'rb').read();sys.stdout.buffer.write(struct.pack('>BI',0,len(p))+p)" \
  "$FIX/grpc/batch64x16.request.pb" > "$W/grpc.req"
h2load -n "$REQUESTS" -c 4 -m 32 -t 1 -H 'content-type: application/grpc' -H 'te: trailers' -d "$W/grpc.req" \
  "http://127.0.0.1:$M_GRPC/tensorflow.serving.PredictionService/Predict" | grep -E "^(finished in|requests:)"
curl -s "http://127.0.0.1:$M_ADMIN/metrics" | grep -E '^mltap_capture_(dropped|count_enqueued|uncounted|enqueued)_total' || true
kill -TERM "$MLTAP_PID"; wait "$MLTAP_PID" || true
python3 - "$W/out/anodot" "$REQUESTS" <<'PY'
import json, pathlib, sys
root, sent = pathlib.Path(sys.argv[1]), int(sys.argv[2])
totals, fractions = {}, []
for f in root.rglob("*.json"):
    for p in json.loads(f.read_text()):
        what = p["properties"]["what"]
        if what in ("request_count", "prediction_count", "buffer_count"):
            totals[what] = totals.get(what, 0) + p["value"]
        if what == "sampled_fraction":
            fractions.append(p["value"])
rc, pc = totals.get("request_count", 0), totals.get("prediction_count", 0)
print(f"request_count {rc:.0f} (sent {sent}), prediction_count {pc:.0f} (sent {64 * sent}), buffer_count {totals.get('buffer_count', 0):.0f}")
if fractions:
    print(f"sampled_fraction per bucket: min {min(fractions):.3f}, max {max(fractions):.3f} over {len(fractions)} buckets")
ok = rc == sent and pc == 64 * sent
print("EXACT" if ok else "NOT EXACT")
sys.exit(0 if ok else 1)
PY
