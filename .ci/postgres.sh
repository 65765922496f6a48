# A throwaway PostgreSQL cluster for KoboldFS's tests.
#
# By hand, in bash:
#     source .ci/postgres.sh      # start one; stopped and deleted when this shell exits
#     koboldfs_pg_stop            # ...or now
# or around one command:
#     bash .ci/postgres.sh .venv/bin/python -m twisted.trial koboldfs
#
# Once started it exports:
#     KOBOLDFS_TEST_POSTGRES_URL  postgresql://postgres@127.0.0.1:PORT/koboldfs_test
#     KOBOLDFS_TEST_PG_BIN        the PostgreSQL bin directory (initdb, pg_ctl, pg_basebackup...)
#     KOBOLDFS_TEST_PGDATA        this cluster's data directory
#     KOBOLDFS_TEST_PG_USER       the OS user that owns it ("postgres" when we are root)
# The cluster runs as the OS user postgres when started by root (initdb and
# pg_ctl refuse to run as root); otherwise as the current user.  It listens on
# a free port on 127.0.0.1 only, trusts every local connection, and keeps the
# default fsync=on.  Collation is C (byte order, as SQLite sorts keys).
#
# Set KOBOLDFS_PG_NO_TRAP=1 before sourcing to call koboldfs_pg_start and
# koboldfs_pg_stop yourself (as .ci/run does) instead of an EXIT trap.

_kpg_log() { echo "postgres.sh: $*" >&2; }

_kpg_as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# Find PostgreSQL's server binaries, installing Debian's packages if needed.
_kpg_find_bin() {
    local d
    if [ -n "${KOBOLDFS_TEST_PG_BIN:-}" ] && [ -x "$KOBOLDFS_TEST_PG_BIN/initdb" ]; then
        return 0
    fi
    for d in /usr/lib/postgresql/15/bin $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -rV); do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
            KOBOLDFS_TEST_PG_BIN=$d
            return 0
        fi
    done
    return 1
}

_kpg_install() {
    if [ "$(id -u)" != 0 ]; then
        _kpg_log "PostgreSQL server binaries not found (and not root to install them)"
        return 1
    fi
    _kpg_log "installing PostgreSQL from Debian's packages"
    local made_policy=
    # Don't let the package start a cluster of its own.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    local rc=0
    apt-get update -qq || rc=$?
    if [ "$rc" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            postgresql-15 >/dev/null ||
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            postgresql >/dev/null || rc=$?
    fi
    [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d
    return "$rc"
}

koboldfs_pg_start() {
    if [ -n "${KOBOLDFS_PG_DIR:-}" ] && [ -d "${KOBOLDFS_PG_DIR}" ]; then
        _kpg_log "already running in $KOBOLDFS_PG_DIR"
        return 0
    fi
    _kpg_find_bin || { _kpg_install && _kpg_find_bin; } || {
        _kpg_log "no PostgreSQL server binaries"
        return 1
    }
    if [ "$(id -u)" = 0 ] && ! id -u postgres >/dev/null 2>&1; then
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin postgres || return 1
    fi

    local base=/tmp
    [ "$(id -u)" != 0 ] && base=${TMPDIR:-/tmp}
    KOBOLDFS_PG_DIR=$(mktemp -d "$base/koboldfs-pg.XXXXXX") || return 1
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$KOBOLDFS_PG_DIR" || { koboldfs_pg_stop; return 1; }
    fi
    chmod 755 "$KOBOLDFS_PG_DIR"
    local data=$KOBOLDFS_PG_DIR/data port
    port=$(python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])') || { koboldfs_pg_stop; return 1; }

    if ! _kpg_as_owner "$KOBOLDFS_TEST_PG_BIN/initdb" -D "$data" -U postgres --auth=trust \
            -E UTF8 --locale=C --no-sync >"$KOBOLDFS_PG_DIR/initdb.log" 2>&1; then
        _kpg_log "initdb failed:"
        cat "$KOBOLDFS_PG_DIR/initdb.log" >&2
        koboldfs_pg_stop
        return 1
    fi
    # In postgresql.conf, not pg_ctl -o, so that a later plain restart keeps them.
    _kpg_as_owner tee -a "$data/postgresql.conf" >/dev/null <<EOF

# koboldfs test cluster
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$KOBOLDFS_PG_DIR'
max_connections = 200
EOF
    if ! _kpg_as_owner "$KOBOLDFS_TEST_PG_BIN/pg_ctl" -D "$data" -l "$KOBOLDFS_PG_DIR/postgres.log" \
            -w -t 60 start >/dev/null; then
        _kpg_log "pg_ctl start failed:"
        cat "$KOBOLDFS_PG_DIR/postgres.log" >&2
        koboldfs_pg_stop
        return 1
    fi
    if ! "$KOBOLDFS_TEST_PG_BIN/createdb" -h 127.0.0.1 -p "$port" -U postgres koboldfs_test; then
        _kpg_log "createdb failed"
        koboldfs_pg_stop
        return 1
    fi
    export KOBOLDFS_PG_DIR KOBOLDFS_TEST_PG_BIN
    export KOBOLDFS_TEST_PGDATA=$data
    export KOBOLDFS_TEST_PG_USER
    KOBOLDFS_TEST_PG_USER=$(if [ "$(id -u)" = 0 ]; then echo postgres; else id -un; fi)
    export KOBOLDFS_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$port/koboldfs_test"
    _kpg_log "PostgreSQL $("$KOBOLDFS_TEST_PG_BIN/pg_ctl" --version | awk '{print $3}')" \
        "up at $KOBOLDFS_TEST_POSTGRES_URL (data in $data)"
}

# Stop the cluster at once and delete it.  Safe to call more than once.
koboldfs_pg_stop() {
    local dir=${KOBOLDFS_PG_DIR:-}
    if [ -n "$dir" ] && [ -d "$dir" ]; then
        if [ -f "$dir/data/postmaster.pid" ]; then
            local pid n=0
            pid=$(head -n 1 "$dir/data/postmaster.pid" 2>/dev/null)
            if ! _kpg_as_owner "$KOBOLDFS_TEST_PG_BIN/pg_ctl" -D "$dir/data" -m immediate \
                    -w -t 30 stop >/dev/null 2>&1; then
                # Only if that pid is still a postgres process (not a reused pid).
                if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = postgres ]; then
                    kill -9 "$pid" 2>/dev/null
                fi
            fi
            # Until the postmaster is gone from the process table (reaped).
            while [ -n "$pid" ] && [ -e "/proc/$pid" ] && [ "$n" -lt 100 ]; do
                sleep 0.05
                n=$((n + 1))
            done
        fi
        rm -rf "$dir"
    fi
    unset KOBOLDFS_PG_DIR KOBOLDFS_TEST_POSTGRES_URL KOBOLDFS_TEST_PGDATA KOBOLDFS_TEST_PG_USER
    return 0
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    # Run as a script: start, run the command given, stop.
    trap koboldfs_pg_stop EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
    koboldfs_pg_start || exit 1
    if [ $# -eq 0 ]; then
        echo "usage: bash .ci/postgres.sh COMMAND [ARG...]   (or: source .ci/postgres.sh)" >&2
        exit 2
    fi
    "$@"
    exit $?
elif [ -z "${KOBOLDFS_PG_NO_TRAP:-}" ]; then
    # Sourced: start now, stop when the sourcing shell exits.
    if koboldfs_pg_start; then
        trap koboldfs_pg_stop EXIT
    fi
fi
