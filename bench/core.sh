#!/usr/bin/env bash
# Relay-core benchmarks: ringcast against the tokio-tungstenite baseline on
# the same workloads, server pinned to one core and load generator to the
# other. Each run starts a fresh server; every loadgen JSON line goes to
# bench/results/core-<date>-<host>.jsonl, and a median table is printed.
#
#   bench/core.sh [runs=3]
#
# Loopback only. Needs two CPUs (cores 0 and 1) and a release build:
#   cargo build --release --workspace
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
BIN=target/release
OUT=bench/results/core-$(date +%Y%m%d)-$(hostname).jsonl
[ -n "${APPEND:-}" ] || : > "$OUT"
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
IPS=127.0.0.1-127.0.0.20

start_server() { # kind port extra-args...
    local kind=$1 port=$2; shift 2
    case $kind in
        ringcast) taskset -c "$SERVER_CPU" $BIN/ringcast --workers 1 --listen 127.0.0.1:$port \
                      --metrics-addr 127.0.0.1:0 --log warn --allow-client-publish true \
                      --max-frames-per-second 0 --max-bytes-per-second 0 "$@" > /tmp/core-bench-server.out 2>&1 & ;;
        baseline) taskset -c "$SERVER_CPU" $BIN/baseline --threads 1 --listen 127.0.0.1:$port \
                      > /tmp/core-bench-server.out 2>&1 & ;;
    esac
    SERVER_PID=$!
    for _ in $(seq 100); do grep -q listening /tmp/core-bench-server.out 2>/dev/null && return; sleep 0.05; done
    echo "server $kind did not start" >&2; exit 1
}

stop_server() { kill -TERM "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; }
trap stop_server EXIT

load() { # kind label loadgen-args...
    local kind=$1 label=$2 port; shift 2
    port=$([ "$kind" = ringcast ] && echo 8080 || echo 8090)
    taskset -c "$LOAD_CPU" $BIN/loadgen --url ws://127.0.0.1:$port/ws --server-pid "$SERVER_PID" \
        --source-ips $IPS --label "$kind/$label" "$@" 2>/dev/null | tail -1 | tee -a "$OUT" | cut -c1-160
}

run() { # kind label loadgen-args...
    # ONLY=regex runs just the matching workloads (appending with APPEND=1).
    [[ -z "${ONLY:-}" || "$2" =~ $ONLY ]] || return 0
    local kind=$1 port
    port=$([ "$kind" = ringcast ] && echo 8080 || echo 8090)
    for _ in $(seq "$RUNS"); do
        start_server "$kind" "$port" --max-publish-rate 0
        load "$@"
        stop_server
        sleep 1
    done
}

for kind in ${KINDS:-ringcast baseline}; do
    run $kind broadcast-saturation fanout --connections 10000 --duration 5 --payload 100
    run $kind broadcast-at-5pps fanout --connections 10000 --duration 5 --payload 100 --rate 5
    run $kind many-channels fanout --connections 10000 --channels 1000 --subs-per-conn 10 --duration 5 --payload 100
    run $kind many-channels-at-500pps fanout --connections 10000 --channels 1000 --subs-per-conn 10 --duration 5 --payload 100 --rate 500
    run $kind connect connect --connections 10000 --concurrency 200
    run $kind idle-15k idle --connections 15000 --hold 3
done
# ringcast at half its own saturation rates: set HALF_RATE and
# HALF_RATE_MANY (publications/s) from a first run's saturation figures.
if [ -n "${HALF_RATE:-}" ]; then
    run ringcast "broadcast-at-${HALF_RATE}pps" fanout --connections 10000 --duration 5 --payload 100 --rate "$HALF_RATE"
fi
if [ -n "${HALF_RATE_MANY:-}" ]; then
    run ringcast "many-channels-at-${HALF_RATE_MANY}pps" fanout --connections 10000 --channels 1000 --subs-per-conn 10 --duration 5 --payload 100 --rate "$HALF_RATE_MANY"
fi
python3 bench/summarize.py "$OUT"
