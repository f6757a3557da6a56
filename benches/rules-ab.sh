#!/usr/bin/env bash
# Interleaved A/B of the rules' cost end to end: one herald release binary, one node on the memory
# backend, 10 WebSocket subscribers, 20,000 publishes/s of chat.message, served with the shipped
# rules/ against a rules directory with none (channel defaults decide):
#   benches/rules-ab.sh [BIN] [REPS]
# Prints one JSON line per run, then the median engine CPU per delivery of each and the ratio
# "no rules / rules" (the issue's "rules >= 90 % of no rules"). Build first:
#   cargo build --release --example loadgen --bin herald
# Nothing else should run on the box meanwhile (never compile while measuring).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$(realpath "${1:-$ROOT/target/release/herald}") REPS=${2:-3}
LG=$ROOT/target/release/examples/loadgen
PORT=${PORT:-7182} RATE=${RATE:-20000}
export HERALD_JWT_SECRET=bench-secret-0123456789 HERALD_API_KEY=bench-api-key-0123 \
    HERALD_ADMIN_KEY=bench-admin-key-0123 HERALD_LOG=warn
ulimit -n 65536 2>/dev/null || true
OUT=$(mktemp /tmp/herald-rules-ab.XXXXXX.jsonl)
run() { # NAME (rules | none)
    local dir; dir=$(mktemp -d /tmp/herald-rules-ab.XXXXXX)
    cp "$ROOT/channels.toml" "$dir/"
    mkdir "$dir/rules"
    [ "$1" = rules ] && cp -r "$ROOT/rules/." "$dir/rules/"
    (cd "$dir" && exec "$BIN" serve --listen 127.0.0.1:$PORT --rules rules > serve.log 2>&1) & local pid=$!
    for _ in $(seq 50); do curl -sf http://127.0.0.1:$PORT/healthz >/dev/null && break; sleep 0.1; done
    local r; r=$("$LG" --url http://127.0.0.1:$PORT --subscribers 10 --rate "$RATE" --duration 10 \
        --event chat.message --engine-pid $pid 2>/dev/null | tail -1)
    kill $pid 2>/dev/null; wait $pid 2>/dev/null
    rm -rf "$dir"
    echo "{\"rules\":\"$1\",\"result\":${r:-null}}" | tee -a "$OUT"
}
for rep in $(seq "$REPS"); do
    if [ $((rep % 2)) = 1 ]; then run rules; run none; else run none; run rules; fi
done
python3 - "$OUT" <<'PY'
import json, sys, statistics
runs = [json.loads(l) for l in open(sys.argv[1])]
med = {}
for k in ("rules", "none"):
    rs = [r["result"] for r in runs if r["rules"] == k and r["result"]]
    xs = [r["engine_cpu_us_per_delivery"] for r in rs]
    print(f"{k:5}: engine µs/delivery {xs}, completeness {[r.get('completeness') for r in rs]}")
    med[k] = statistics.median(xs) if xs else None
if med["rules"] and med["none"]:
    print(f"no rules / rules = {med['none'] / med['rules']:.3f} (rules at {100 * med['none'] / med['rules']:.0f} % of no rules)")
PY
