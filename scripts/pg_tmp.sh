#!/usr/bin/env bash
# A throwaway PostgreSQL 15 for CI and for trying the farm-wide store by hand: initdb into a temp dir, start it on a
# free loopback port (no TCP outside 127.0.0.1, trust auth for the local user only), print its SQLAlchemy URL.
#
#   eval "$(scripts/pg_tmp.sh start)"   # sets FIGS_PG_DIR and FIGS_TEST_POSTGRES_URL
#   pytest tests/...                    # the store tests use FIGS_TEST_POSTGRES_URL when set
#   scripts/pg_tmp.sh stop "$FIGS_PG_DIR"
#
# Runs as a non-root user only (postgres refuses root): as root it uses the "postgres" account when present.
set -euo pipefail

find_bin() {
    local dir
    for dir in /usr/lib/postgresql/*/bin; do
        [[ -x "$dir/initdb" && -x "$dir/pg_ctl" ]] && { echo "$dir"; return 0; }
    done
    command -v initdb >/dev/null && command -v pg_ctl >/dev/null && { dirname "$(command -v initdb)"; return 0; }
    echo "pg_tmp: initdb/pg_ctl not found (apt-get install postgresql)" >&2
    return 1
}

as_owner() {
    if [[ $(id -u) -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || { echo "pg_tmp: running as root and no 'postgres' user exists" >&2; exit 1; }
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

start() {
    local bin dir port user
    bin=$(find_bin)
    dir=$(mktemp -d -t figs-pg-XXXXXX)
    [[ $(id -u) -eq 0 ]] && chown postgres "$dir"
    user=$([[ $(id -u) -eq 0 ]] && echo postgres || id -un)
    port=$(free_port)
    as_owner "$bin/initdb" -D "$dir/data" -U "$user" --auth=trust --encoding=UTF8 --no-instructions >"$dir/initdb.log"
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c full_page_writes=off" start >/dev/null
    as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U "$user" figs
    echo "$port" >"$dir/port"
    echo "export FIGS_PG_DIR=$dir"
    echo "export FIGS_TEST_POSTGRES_URL=postgresql+psycopg://$user@127.0.0.1:$port/figs"
}

stop() {
    local dir=${1:?usage: pg_tmp.sh stop DIR}
    [[ -f "$dir/data/PG_VERSION" ]] || { echo "pg_tmp: $dir is not a pg_tmp directory" >&2; exit 2; }
    as_owner "$(find_bin)/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
    rm -rf "$dir"
}

case "${1:-}" in
    start) start ;;
    stop) stop "${2:-}" ;;
    *) echo "usage: pg_tmp.sh start | stop DIR" >&2; exit 2 ;;
esac
