#!/usr/bin/env bash
# The side-by-side harness (../shared/bench/peers, or $PEERS) with herald's own driver variants
# added: herald-compact (compact event frames), herald-nagle (TCP_NODELAY off), herald-1w (one
# tokio worker thread per node), herald-queued (no direct writes from the fan-out),
# herald-uncoalesced (coalesced writes off), herald-w50 (a 50 ms coalescing window, against the default 40),
# herald-nouring (one send() per socket from the writer tasks, no io_uring batches), and `floor`
# (examples/fanfloor: the least a node can do; cargo build --release --example fanfloor). The harness is
# copied to a scratch directory (it stays untouched), these drivers are put beside its herald driver,
# and its matrix.sh runs with the arguments and environment given, e.g.
#   HERALD_BIN=$PWD/target/release/herald HERALD_ENSURE_MEMBERSHIP=1 \
#     SYSTEMS=nchan,herald,herald-compact RATES="25 50" REPS=2 benches/peers/matrix.sh --idle 5000
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PEERS=${PEERS:-$HERE/../../../shared/bench/peers}
[ -f "$PEERS/matrix.sh" ] || { echo "no harness at $PEERS (set PEERS)" >&2; exit 1; }
WORK=$(mktemp -d /tmp/herald-peers.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
cp -r "$PEERS/." "$WORK/"
chmod -R u+w "$WORK"
cp "$HERE"/herald-*.js "$HERE"/floor.js "$WORK/drivers/"
"$WORK/matrix.sh" "$@"
