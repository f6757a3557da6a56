#!/usr/bin/env bash
# Interleaved A/B of two herald release binaries with the loadgen, one node on the memory backend:
#   benches/ab.sh OLD_BIN NEW_BIN [REPS]
# Two cases per rep, the order of the builds alternating from rep to rep (the box drifts):
#   fanout   1,000 WebSocket subscribers, 1,000 publishes/s (1M deliveries/s)
#   publish  10 subscribers, 20,000 publishes/s of chat.message through the shipped rules
# Prints one JSON line per run, then the median engine CPU per delivery per case and build and the
# ratio NEW/OLD. Build the loadgen first: cargo build --release --example loadgen.
# Nothing else should run on the box meanwhile (never compile while measuring).
set -uo pipefail
[ $# -ge 2 ] || { sed -n 2,9p "$0"; exit 2; }
OLD=$(realpath "$1") NEW=$(realpath "$2") REPS=${3:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LG=$ROOT/target/release/examples/loadgen
PORT=${PORT:-7181}
export HERALD_JWT_SECRET=bench-secret-0123456789 HERALD_API_KEY=bench-api-key-0123 \
    HERALD_ADMIN_KEY=bench-admin-key-0123 HERALD_LOG=warn
ulimit -n 65536 2>/dev/null || true
OUT=$(mktemp /tmp/herald-ab.XXXXXX.jsonl)
run() { # BIN NAME CASE
    local dir; dir=$(mktemp -d /tmp/herald-ab.XXXXXX)
    cp -r "$ROOT/rules" "$ROOT/channels.toml" "$dir/"
    (cd "$dir" && exec "$1" serve --listen 127.0.0.1:$PORT --rules rules > serve.log 2>&1) & local pid=$!
    for _ in $(seq 50); do curl -sf http://127.0.0.1:$PORT/healthz >/dev/null && break; sleep 0.1; done
    local args
    case $3 in
        fanout) args=(--subscribers 1000 --rate 1000 --duration 10) ;;
        publish) args=(--subscribers 10 --rate 20000 --duration 10 --event chat.message) ;;
    esac
    local r; r=$("$LG" --url http://127.0.0.1:$PORT "${args[@]}" --engine-pid $pid 2>/dev/null | tail -1)
    kill $pid 2>/dev/null; wait $pid 2>/dev/null
    rm -rf "$dir"
    echo "{\"build\":\"$2\",\"case\":\"$3\",\"result\":${r:-null}}" | tee -a "$OUT"
}
for rep in $(seq "$REPS"); do
    for c in fanout publish; do
        if [ $((rep % 2)) = 1 ]; then run "$OLD" old $c; run "$NEW" new $c
        else run "$NEW" new $c; run "$OLD" old $c; fi
    done
done
python3 - "$OUT" <<'PY'
import json, sys, statistics
runs = [json.loads(l) for l in open(sys.argv[1])]
for c in ("fanout", "publish"):
    med = {}
    for b in ("old", "new"):
        xs = [r["result"]["engine_cpu_us_per_delivery"] for r in runs
              if r["case"] == c and r["build"] == b and r["result"]]
        med[b] = statistics.median(xs) if xs else None
        print(f"{c:8} {b}: engine µs/delivery {xs}")
    if med["old"] and med["new"]:
        print(f"{c:8} median new/old = {med['new'] / med['old']:.3f}")
PY
