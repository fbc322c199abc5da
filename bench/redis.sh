#!/usr/bin/env bash
# Redis backplane benchmarks: one node (embedded) against one node and two
# nodes sharing a Redis or a 3-master Redis Cluster, and ringcast's sequenced publish path against
# redis-benchmark running the same publish script on the same Redis.
# Every loadgen JSON line goes to bench/results/redis-<date>-<host>.jsonl;
# a median table is printed at the end.
#
#   bench/redis.sh [runs=3]
#
# Loopback only. Servers (relays and Redis) share core 0, the load generator
# has core 1. Needs a release build (cargo build --release --workspace) and
# redis-server / redis-benchmark (tests/run installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
BIN=target/release
OUT=bench/results/redis-$(date +%Y%m%d)-$(hostname).jsonl
[ -n "${APPEND:-}" ] || : > "$OUT"
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
IPS=127.0.0.1-127.0.0.20
REDIS_PORT=${REDIS_PORT:-6390}
PIDS=()

stop_all() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}
trap stop_all EXIT

start_redis() {
    taskset -c "$SERVER_CPU" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" \
        --appendonly no --daemonize no > /tmp/redis-bench-redis.out 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && return; sleep 0.05; done
    echo "redis-server did not start" >&2; exit 1
}

CLUSTER_PORTS=(6391 6392 6393)
start_cluster() { # three masters, no replicas, fresh state each time
    local seeds=()
    for port in "${CLUSTER_PORTS[@]}"; do
        local dir=/tmp/redis-bench-cluster-$port
        rm -rf "$dir"; mkdir -p "$dir"
        taskset -c "$SERVER_CPU" redis-server --port "$port" --bind 127.0.0.1 --save "" \
            --appendonly no --daemonize no --cluster-enabled yes --dir "$dir" > "$dir/out" 2>&1 &
        PIDS+=($!)
        for _ in $(seq 100); do redis-cli -p "$port" ping 2>/dev/null | grep -q PONG && break; sleep 0.05; done
        seeds+=("127.0.0.1:$port")
    done
    redis-cli --cluster create "${seeds[@]}" --cluster-replicas 0 --cluster-yes > /dev/null
    for port in "${CLUSTER_PORTS[@]}"; do
        for _ in $(seq 200); do
            redis-cli -p "$port" cluster info | grep -q cluster_state:ok && break; sleep 0.05
        done
    done
    CLUSTER_SEEDS=$(IFS=,; echo "${seeds[*]}")
}

start_node() { # port extra-args...
    local port=$1; shift
    local out=/tmp/redis-bench-node-$port.out
    taskset -c "$SERVER_CPU" $BIN/ringcast --workers 1 --listen 127.0.0.1:"$port" \
        --metrics-addr 127.0.0.1:0 --log warn --max-publish-rate 0 --allow-client-publish true \
        --max-frames-per-second 0 --max-bytes-per-second 0 "$@" > "$out" 2>&1 &
    PIDS+=($!)
    NODE_PID=$!
    for _ in $(seq 100); do grep -q listening "$out" 2>/dev/null && break; sleep 0.05; done
    for _ in $(seq 200); do
        curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && return
        sleep 0.05
    done
    echo "node on $port did not become ready" >&2; exit 1
}

load() { # label urls loadgen-args...
    local label=$1 urls=$2; shift 2
    taskset -c "$LOAD_CPU" $BIN/loadgen --url "$urls" --server-pid "$NODE_PID" \
        --source-ips $IPS --label "$label" "$@" 2>/dev/null | tail -1 | tee -a "$OUT" | cut -c1-160
}

# setup: single | redis-1node | redis-2nodes | cluster-2nodes (3 masters)
run() { # setup workload loadgen-args...
    local setup=$1 workload=$2; shift 2
    [[ -z "${ONLY:-}" || "$setup/$workload" =~ $ONLY ]] || return 0
    for _ in $(seq "$RUNS"); do
        local urls=ws://127.0.0.1:8080/ws
        case $setup in
            single) start_node 8080 ;;
            redis-1node) start_redis; start_node 8080 --redis "redis://127.0.0.1:$REDIS_PORT/0" ;;
            redis-2nodes)
                start_redis
                start_node 8081 --redis "redis://127.0.0.1:$REDIS_PORT/0"
                start_node 8080 --redis "redis://127.0.0.1:$REDIS_PORT/0"
                urls=ws://127.0.0.1:8080/ws,ws://127.0.0.1:8081/ws ;;
            cluster-2nodes)
                start_cluster
                start_node 8081 --redis-cluster "$CLUSTER_SEEDS"
                start_node 8080 --redis-cluster "$CLUSTER_SEEDS"
                urls=ws://127.0.0.1:8080/ws,ws://127.0.0.1:8081/ws ;;
        esac
        load "$setup/$workload" "$urls" "$@"
        stop_all
        sleep 1
    done
}

# The publish script's Lua, taken from the source so both sides run the same.
publish_script() {
    python3 - <<'EOF'
import re
src = open("src/backplane/redis/scripts.rs").read()
print(re.search(r'pub const PUBLISH: &str = r#"(.*?)"#;', src, re.S).group(1))
EOF
}

redis_benchmark() { # label "redis-benchmark options" script-args...
    local label=$1 opts=$2; shift 2
    [[ -z "${ONLY:-}" || "redis-benchmark/$label" =~ $ONLY ]] || return 0
    for _ in $(seq "$RUNS"); do
        start_redis
        local sha
        sha=$(redis-cli -p "$REDIS_PORT" SCRIPT LOAD "$(publish_script)")
        local rps
        rps=$(taskset -c "$LOAD_CPU" redis-benchmark -p "$REDIS_PORT" -c 50 -P 16 -n 300000 -q \
            $opts EVALSHA "$sha" "$@" | tr '\r' '\n' | grep -o '[0-9.]* requests per second' | tail -1 | cut -d' ' -f1)
        echo "{\"mode\":\"redis-benchmark\",\"label\":\"redis-benchmark/$label\",\"published_per_sec\":$rps}" | tee -a "$OUT"
        stop_all
        sleep 1
    done
}

PAYLOAD=$(printf 'j"%098d"' 0)
for setup in single redis-1node redis-2nodes cluster-2nodes; do
    run $setup broadcast-saturation fanout --connections 10000 --duration 5 --payload 100
    run $setup broadcast-at-5pps fanout --connections 10000 --duration 5 --payload 100 --rate 5
    run $setup publish-throughput fanout --connections 100 --channels 100 --publishers 4 --window 256 \
        --duration 5 --payload 100
    run $setup publish-throughput-hot fanout --connections 100 --channels 1 --publishers 4 --window 256 \
        --duration 5 --payload 100
done
# The same script call ringcast makes for one publication (a batch of one),
# 50 clients x 16 pipelined, on one hot channel. (Spreading it with
# redis-benchmark's -r would give each key of one call a different random
# number, which breaks the script's seq/history invariant.)
redis_benchmark evalsha-hot-channel "" 3 '{rc:b.0}:seq' '{rc:b.0}:epoch' '{rc:b.0}:hist' \
    100 300000 86400000 e PUBLISH rc:b.0 1 "$PAYLOAD"
python3 bench/summarize.py "$OUT"
