#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests: installed with apt-get when missing, run as a
# non-root user in a temporary data directory on 127.0.0.1.
#
#   eval "$(scripts/postgres.sh start)"   # prints `export SEARCHLOOP_PG_URL=...`
#   scripts/postgres.sh stop
#
# Idempotent: `start` on a running server only prints the URL again.
set -euo pipefail

port="${SEARCHLOOP_PG_PORT:-55432}"
data="${SEARCHLOOP_PG_DIR:-${TMPDIR:-/tmp}/searchloop-pg-$port}"
db=searchloop_test
role=searchloop

log() { echo "postgres.sh: $*" >&2; }

find_bindir() {
    if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then
        pg_config --bindir
        return
    fi
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$dir" ] && [ -x "$dir/initdb" ] && echo "$dir"
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

bindir=$(find_bindir || true)
if [ -z "$bindir" ]; then
    log "PostgreSQL not found; installing it with apt-get"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    bindir=$(find_bindir) || { log "PostgreSQL is still missing after apt-get install"; exit 1; }
fi

# PostgreSQL refuses to run as root, so root runs it as an unprivileged user.
if [ "$(id -u)" = 0 ]; then
    runner=postgres
    id "$runner" >/dev/null 2>&1 || useradd --system --no-create-home "$runner"
    run() { runuser -u "$runner" -- "$@"; }
else
    run() { "$@"; }
fi

url="postgres://$role@127.0.0.1:$port/$db"

case "${1:-}" in
start)
    if run "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        echo "export SEARCHLOOP_PG_URL=$url"
        exit 0
    fi
    mkdir -p "$data"
    [ "$(id -u)" = 0 ] && chown "$runner" "$data"
    if [ ! -f "$data/PG_VERSION" ]; then
        run "$bindir/initdb" -D "$data" -U "$role" -A trust --no-sync >/dev/null
    fi
    run "$bindir/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 \
        -o "-p $port -k $data -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=200" start >&2
    run "$bindir/psql" -h 127.0.0.1 -p "$port" -U "$role" -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 ||
        run "$bindir/createdb" -h 127.0.0.1 -p "$port" -U "$role" "$db"
    echo "export SEARCHLOOP_PG_URL=$url"
    ;;
stop)
    run "$bindir/pg_ctl" -D "$data" -m fast -w stop >&2 || true
    ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
