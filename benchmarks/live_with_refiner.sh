#!/usr/bin/env bash
# Live sessions while the refiner works on the same device: serve MODEL on DEVICE with a data dir (its refine
# worker yields to live steps), stream SESSIONS sessions for SECONDS (recorded, then queued for refinement),
# then stream SESSIONS more for SECONDS while those are refined, and report both phases and the jobs.
#
#   benchmarks/live_with_refiner.sh tiny cpu 2 20                       # the CPU VM
#   benchmarks/live_with_refiner.sh sana-wm-streaming cuda 4 60          # an H100 (release-size random weights)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-tiny} DEVICE=${2:-cpu} SESSIONS=${3:-2} SECONDS_EACH=${4:-20}
PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
DATA=$(mktemp -d /tmp/live-refiner-XXXX)
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$PY" -m stream_server.cli serve --model "$MODEL" --device "$DEVICE" --port "$PORT" --data-dir "$DATA" \
  --max-sessions "$SESSIONS" --grace-period 5 >"$DATA/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 1; done
echo "phase 1: $SESSIONS sessions, nothing to refine yet"
"$PY" benchmarks/latency.py --url "http://127.0.0.1:$PORT" --sessions "$SESSIONS" --seconds "$SECONDS_EACH"
echo "phase 2: $SESSIONS sessions while phase 1's recordings are refined"
"$PY" benchmarks/latency.py --url "http://127.0.0.1:$PORT" --sessions "$SESSIONS" --seconds "$SECONDS_EACH"
"$PY" - "$DATA" <<'EOF'
import sqlite3, sys
rows = sqlite3.connect(f"{sys.argv[1]}/jobs.sqlite3").execute("SELECT state, progress FROM jobs ORDER BY created_at").fetchall()
print("jobs (state, progress of the current attempt):", rows)
EOF
[[ "$DEVICE" == cuda* ]] && nvidia-smi --query-gpu=memory.used,memory.total --format=csv || true
