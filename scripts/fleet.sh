#!/usr/bin/env bash
# A searchloop fleet on one machine: PostgreSQL (scripts/postgres.sh), N serving replicas on
# consecutive loopback ports and one trainer, on the demo's retail data set and the embedded
# model. DEPLOY.md walks through it; the same layout runs across machines with systemd.
#
#   scripts/fleet.sh start [N]   # N replicas (default 3) on ports 8081.., the trainer on 8090
#   scripts/fleet.sh status      # each process's /healthz
#   scripts/fleet.sh stop
#
# Needs the release binary (`cargo build --release -p searchloop-cli`). Everything lives in
# $SEARCHLOOP_FLEET_DIR (default ./searchloop-fleet): configs, per-replica adapter caches, the
# trainer's adapters, logs and pid files.
set -euo pipefail
cd "$(dirname "$0")/.."

dir="${SEARCHLOOP_FLEET_DIR:-searchloop-fleet}"
bin="${SEARCHLOOP_BIN:-target/release/searchloop}"
trainer_port=8090
first_port=8081

log() { echo "fleet.sh: $*" >&2; }

# The demo's config with the fleet's store and this process's own adapter cache and name.
write_config() {
    local name=$1 url=$2 learn=$3
    sed -e "s|^url = \"searchloop.db\"|url = \"$url\"\nadapter_cache = \"cache-$name\"|" \
        "$dir/searchloop.toml" > "$dir/$name.toml"
    echo "replica_id = \"$name\"" | cat - "$dir/$name.toml" > "$dir/$name.toml.tmp"
    mv "$dir/$name.toml.tmp" "$dir/$name.toml"
    if [ "$learn" = yes ]; then
        cat >> "$dir/$name.toml" <<EOF

[learn]
adapters_dir = "adapters-$name"
[learn.eval]
set = "data/questions.jsonl"
questions = 16
[learn.round]
source = "replay"
prompts = "data/questions.jsonl"
prompts_per_round = 2
group_size = 8
rollout_temperature = 1.0
dynamic_sampling = true
EOF
    fi
}

start_one() {
    local name=$1 port=$2
    shift 2
    "$bin" --config "$dir/$name.toml" serve --bind "127.0.0.1:$port" "$@" \
        > "$dir/$name.log" 2>&1 &
    echo $! > "$dir/$name.pid"
    log "$name: pid $(cat "$dir/$name.pid"), http://127.0.0.1:$port, log $dir/$name.log"
}

wait_healthy() {
    local port=$1
    for _ in $(seq 1 240); do
        if curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.5
    done
    log "nothing answers on port $port; see the logs in $dir"
    return 1
}

case "${1:-}" in
start)
    replicas="${2:-3}"
    [ -x "$bin" ] || { log "$bin is missing: cargo build --release -p searchloop-cli"; exit 1; }
    eval "$(scripts/postgres.sh start)"
    # One schema per fleet directory, created on first start.
    schema=fleet_$(basename "$dir" | tr -c 'a-zA-Z0-9\n' '_')
    psql_url="${SEARCHLOOP_PG_URL}"
    "$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)/psql" -q "$psql_url" \
        -c "CREATE SCHEMA IF NOT EXISTS $schema" >/dev/null
    url="${psql_url}?options[search_path]=$schema"
    if [ ! -f "$dir/searchloop.toml" ]; then
        log "writing the demo's data set and config into $dir"
        "$bin" demo --workdir "$dir" --questions 1 >/dev/null
    fi
    write_config trainer "$url" yes
    start_one trainer "$trainer_port" --learn
    wait_healthy "$trainer_port"
    for i in $(seq 1 "$replicas"); do
        write_config "replica-$i" "$url" no
        start_one "replica-$i" $((first_port + i - 1)) --follow 5
    done
    for i in $(seq 1 "$replicas"); do wait_healthy $((first_port + i - 1)); done
    log "the fleet serves: replicas on ports $first_port..$((first_port + replicas - 1)), the trainer on $trainer_port"
    ;;
status)
    for pidfile in "$dir"/*.pid; do
        [ -e "$pidfile" ] || continue
        name=$(basename "$pidfile" .pid)
        port=$(grep -o 'serving on http://[0-9.:]*' "$dir/$name.log" | sed 's|.*:||' || true)
        printf '%-12s ' "$name"
        curl -fsS "http://127.0.0.1:$port/healthz" || printf 'not answering'
        echo
    done
    ;;
stop)
    for pidfile in "$dir"/*.pid; do
        [ -e "$pidfile" ] || continue
        kill "$(cat "$pidfile")" 2>/dev/null || true
        rm -f "$pidfile"
    done
    log "stopped (PostgreSQL keeps running: scripts/postgres.sh stop)"
    ;;
*)
    echo "usage: scripts/fleet.sh start [N] | status | stop" >&2
    exit 2
    ;;
esac
