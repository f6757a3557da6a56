#!/usr/bin/env bash
# What the presence heartbeat costs Redis: one herald node on a private Redis, N WebSocket sessions
# (one user each, members of room:bench and subscribed to it, so each has a room presence entry),
# a short heartbeat so many beats land in the window, one publish a second; Redis's CPU over a
# quiet window divided by the session heartbeats in it. Several binaries run interleaved (A/B):
#   benches/heartbeat-redis.sh BIN [BIN...]        env: SESSIONS=2000 BEAT=2 WINDOW=20 REPS=3
# Build first: cargo build --release --example loadgen --bin herald. Needs redis-server. DUMP=1
# also prints each run's INFO commandstats (which commands the scripts ran) to stderr.
# Nothing else should run on the box meanwhile (never compile while measuring).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LG=$ROOT/target/release/examples/loadgen
SESSIONS=${SESSIONS:-2000} BEAT=${BEAT:-2} WINDOW=${WINDOW:-20} REPS=${REPS:-3} PORT=${PORT:-7183}
[ $# -ge 1 ] || { echo "usage: $0 BIN [BIN...]" >&2; exit 2; }
export HERALD_JWT_SECRET=bench-secret-0123456789 HERALD_API_KEY=bench-api-key-0123 \
    HERALD_ADMIN_KEY=bench-admin-key-0123 HERALD_LOG=warn HERALD_HEARTBEAT=$BEAT
ulimit -n 65536 2>/dev/null || true
TICK=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; } # utime + stime, in clock ticks
run() { # BIN
    local dir; dir=$(mktemp -d /tmp/herald-hb.XXXXXX)
    redis-server --port 0 --unixsocket "$dir/redis.sock" --save '' --appendonly no \
        --daemonize yes --pidfile "$dir/redis.pid" --dir "$dir" >/dev/null
    for _ in $(seq 50); do [ -s "$dir/redis.pid" ] && [ -S "$dir/redis.sock" ] && break; sleep 0.1; done
    local rpid; rpid=$(cat "$dir/redis.pid")
    "$1" serve --listen 127.0.0.1:$PORT --redis "unix://$dir/redis.sock" > "$dir/serve.log" 2>&1 & local pid=$!
    for _ in $(seq 100); do curl -sf http://127.0.0.1:$PORT/healthz >/dev/null && break; sleep 0.1; done
    "$LG" --url http://127.0.0.1:$PORT --subscribers "$SESSIONS" --rate 1 \
        --duration $((WINDOW + 20)) > "$dir/lg.json" 2>/dev/null & local lg=$!
    sleep 10 # memberships, connects, subscribes, the first beats
    local c0; c0=$(cpu "$rpid")
    redis-cli -s "$dir/redis.sock" CONFIG RESETSTAT >/dev/null
    sleep "$WINDOW"
    local c1; c1=$(cpu "$rpid")
    local stats; stats=$(redis-cli -s "$dir/redis.sock" INFO commandstats |
        awk -F'[=,:]' '/^cmdstat_evalsha:/ {print $3, $5}')
    [ -n "${DUMP:-}" ] && redis-cli -s "$dir/redis.sock" INFO commandstats >&2
    kill $lg $pid 2>/dev/null; wait $lg $pid 2>/dev/null
    kill "$rpid" 2>/dev/null
    rm -rf "$dir"
    python3 - "$1" "$c0" "$c1" "$TICK" "$SESSIONS" "$WINDOW" "$BEAT" ${stats:-0 0} <<'PY'
import json, sys
bin_, c0, c1, tick, n, window, beat, calls, usec = sys.argv[1:]
us = (int(c1) - int(c0)) * 1e6 / int(tick)
beats = int(n) * int(window) / int(beat)
print(json.dumps({"bin": bin_, "redis_cpu_us": us, "session_beats": beats,
                  "redis_us_per_session_beat": round(us / beats, 2), "evalsha_calls": int(calls),
                  "evalsha_us_per_session_beat": round(int(usec) / beats, 2)}))
PY
}
for rep in $(seq "$REPS"); do
    if [ $((rep % 2)) = 1 ]; then order=("$@"); else order=(); for ((i = $#; i >= 1; i--)); do order+=("${!i}"); done; fi
    for b in "${order[@]}"; do run "$(realpath "$b")"; done
done
