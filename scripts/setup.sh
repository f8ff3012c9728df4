#!/usr/bin/env bash
# Make this machine able to build, run and test Orrery, and start the two
# services it needs on loopback:
#
#   - a Rust toolchain (cargo) and a C compiler (some crates build C);
#   - PostgreSQL on 127.0.0.1:5432, reachable as user `postgres` without a password;
#   - Redis 7 (RESP3) on 127.0.0.1:6379; `redis-server` on PATH (tests spawn one).
#
# Idempotent: whatever is already installed and running is left alone, so on a
# machine where everything is up it only checks and returns. It installs
# Debian packages (apt-get; through sudo when not root) only for what is
# missing, and prints every action it takes.
set -euo pipefail

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

PG_HOST=127.0.0.1
PG_PORT=5432
REDIS_HOST=127.0.0.1
REDIS_PORT=6379
WAIT_SECONDS=30

# rustup's cargo lives in ~/.cargo/bin (or /usr/lib/rustup/bin with Debian's
# rustup package), which a fresh shell may not have on PATH.
for dir in /usr/lib/rustup/bin "${CARGO_HOME:-$HOME/.cargo}/bin"; do
    if [ -d "$dir" ]; then PATH="$dir:$PATH"; fi
done
# Debian keeps pg_ctlcluster & co. in /usr/bin, but the server binaries live here.
PATH="$PATH:/usr/sbin:/sbin"
export PATH

# ---------------------------------------------------------------- privileges

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif have sudo; then
    SUDO=(sudo)
else
    SUDO=()
fi

as_root() {
    if [ "$(id -u)" -eq 0 ] || [ "${#SUDO[@]}" -gt 0 ]; then
        "${SUDO[@]}" "$@"
    else
        die "need root for: $* (run as root or install sudo)"
    fi
}

# Run a command as the `postgres` OS user (owner of the cluster).
as_postgres() {
    (
        cd /  # the postgres user may not be allowed into the current directory
        if [ "$(id -u)" -eq 0 ]; then
            if have runuser; then runuser -u postgres -- "$@"; else su postgres -s /bin/sh -c "$(printf '%q ' "$@")"; fi
        elif have sudo; then
            sudo -u postgres "$@"
        else
            die "need root or sudo to run '$*' as the postgres user"
        fi
    )
}

APT_UPDATED=0
apt_install() {
    have apt-get || die "cannot install $* automatically: apt-get not found (this script targets Debian/Ubuntu); install them by hand"
    if [ "$APT_UPDATED" -eq 0 ]; then
        say "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
        APT_UPDATED=1
    fi
    say "apt-get install -y $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

# Is something listening on host:port? (bash's /dev/tcp, no extra tools)
port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

# systemd is PID 1 (a normal machine) vs a container without an init system.
have_systemd() { [ -d /run/systemd/system ]; }

# ---------------------------------------------------------------- build tools

missing=()
have cc || missing+=(build-essential)        # a C compiler and libc headers
have pkg-config || missing+=(pkg-config)
have curl || missing+=(curl)                 # scripts/demo.sh polls /readyz with it
[ -e /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
fi

# ---------------------------------------------------------------- local containers
# The `local` provider runs each cluster node as a container with its own
# sshd (openssh-server), network namespace and veth (iproute2), mount/UTS/PID
# namespaces (util-linux: unshare, setsid, pivot_root; mount), and the agent
# script heartbeats through bash's /dev/tcp (curl, installed above, when a
# host has no bash). useradd/groupadd (passwd) and pkill (procps)
# create and remove cluster users. Nothing is started here: sshd only runs
# inside containers, and the bridge is made on demand.
missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
have ip || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || missing+=(iproute2)
have unshare || missing+=(util-linux)
have mount || missing+=(mount)
have pkill || missing+=(procps)
have useradd || [ -x /usr/sbin/useradd ] || missing+=(passwd)
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
fi

if ! have cargo; then
    say "cargo not found: installing Rust with rustup"
    if ! have rustup; then
        # Debian 13 (trixie) and later package rustup; Debian 12 does not.
        apt_install rustup || say "no Debian package 'rustup' on this release"
    fi
    if ! have rustup; then
        say "falling back to the official installer (https://rustup.rs)"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
            | sh -s -- -y --profile minimal --default-toolchain stable \
            || die "could not install Rust. Install a current stable toolchain yourself (https://rustup.rs), make sure 'cargo' is on PATH, and run this again."
    fi
    PATH="/usr/lib/rustup/bin:${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
    rustup default stable || die "'rustup default stable' failed (no network?). Install a current stable toolchain with rustup yourself, then run this again."
    have cargo || die "rustup is installed but 'cargo' is not on PATH; add ${CARGO_HOME:-$HOME/.cargo}/bin to PATH and run this again"
    say "installed $(cargo --version)"
fi

# ---------------------------------------------------------------- packages

pg_installed() { ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; }

missing=()
if ! pg_installed && ! port_open "$PG_HOST" "$PG_PORT"; then
    missing+=(postgresql)
fi
# Client tools: psql, pg_isready (postgresql-client), also wanted when the
# server runs elsewhere (a container, another package).
if ! have psql || ! have pg_isready; then
    missing+=(postgresql-client)
fi
# redis-server must be on PATH even if a Redis already answers: the tests
# start a private one. redis-tools carries redis-cli.
have redis-server || missing+=(redis-server)
have redis-cli || missing+=(redis-tools)
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
fi

# ---------------------------------------------------------------- PostgreSQL

pg_ready() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT" >/dev/null 2>&1; }

if ! pg_ready; then
    pg_installed || die "PostgreSQL is neither reachable on $PG_HOST:$PG_PORT nor installed"
    # The newest installed major version, e.g. 15 for /usr/lib/postgresql/15.
    ver="$(ls /usr/lib/postgresql | sort -n | tail -n 1)"
    if [ ! -d "/etc/postgresql/$ver/main" ]; then
        say "creating PostgreSQL $ver cluster 'main' (port $PG_PORT, listening on localhost only)"
        as_root pg_createcluster --port "$PG_PORT" "$ver" main >/dev/null
    fi
    say "starting PostgreSQL $ver/main"
    if have_systemd; then
        as_root systemctl start "postgresql@$ver-main"
    else
        as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start
    fi
    for _ in $(seq "$WAIT_SECONDS"); do pg_ready && break; sleep 1; done
    pg_ready || die "PostgreSQL $ver/main did not answer on $PG_HOST:$PG_PORT within ${WAIT_SECONDS}s; see /var/log/postgresql/postgresql-$ver-main.log (is its port $PG_PORT? /etc/postgresql/$ver/main/postgresql.conf)"
fi

pg_login() { psql -w -X -q -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; }

if ! pg_login; then
    # A fresh Debian install authenticates TCP with scram-sha-256, and the
    # postgres role has no password. Orrery's default URL
    # (postgres://postgres@127.0.0.1:5432/orrery) needs password-less access,
    # so trust connections from the loopback addresses only (127.0.0.1/32 and
    # ::1/128): nothing from another host is affected. Remove the two lines
    # marked "orrery" at the top of pg_hba.conf to undo.
    pg_installed || die "cannot log in to PostgreSQL on $PG_HOST:$PG_PORT as user postgres without a password, and it is not a local Debian install this script can configure; set ORRERY_DATABASE_URL with credentials instead"
    hba="$(as_postgres psql -X -p "$PG_PORT" -Atc 'show hba_file' 2>/dev/null || true)"
    [ -n "$hba" ] || die "cannot find pg_hba.conf (psql as the postgres OS user failed)"
    if ! as_root grep -q '# orrery: loopback trust' "$hba"; then
        say "allowing password-less loopback connections: adding 'host all all 127.0.0.1/32 trust' and '::1/128 trust' at the top of $hba"
        tmp="$(mktemp)"
        {
            echo "host all all 127.0.0.1/32 trust # orrery: loopback trust (scripts/setup.sh)"
            echo "host all all ::1/128      trust # orrery: loopback trust (scripts/setup.sh)"
            as_root cat "$hba"
        } >"$tmp"
        as_root cp "$tmp" "$hba"
        rm -f "$tmp"
    fi
    say "reloading PostgreSQL configuration"
    as_postgres psql -X -q -p "$PG_PORT" -Atc 'select pg_reload_conf()' >/dev/null
    for _ in $(seq 10); do pg_login && break; sleep 1; done
    pg_login || die "still cannot connect as postgres to $PG_HOST:$PG_PORT without a password; check $hba"
fi
say "PostgreSQL ok on $PG_HOST:$PG_PORT ($(psql -w -X -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -Atc 'show server_version'))"

# ---------------------------------------------------------------- Redis

redis_ready() { [ "$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = "PONG" ]; }

if ! redis_ready; then
    if have_systemd && [ -e /lib/systemd/system/redis-server.service ]; then
        say "starting Redis (systemctl start redis-server)"
        as_root systemctl start redis-server || true
    fi
    if ! redis_ready; then
        say "starting Redis on $REDIS_HOST:$REDIS_PORT (daemonized, loopback only, no persistence)"
        # Orrery keeps nothing in Redis that PostgreSQL lacks: no persistence needed.
        redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
            --save "" --appendonly no --dir /tmp >/dev/null
    fi
    for _ in $(seq "$WAIT_SECONDS"); do redis_ready && break; sleep 1; done
    redis_ready || die "Redis did not answer on $REDIS_HOST:$REDIS_PORT within ${WAIT_SECONDS}s"
fi

redis_version="$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" info server 2>/dev/null | tr -d '\r' | sed -n 's/^redis_version://p')"
if [ "${redis_version%%.*}" -lt 7 ] 2>/dev/null; then
    die "Redis on $REDIS_HOST:$REDIS_PORT is $redis_version; Orrery needs Redis 7 or later (RESP3)"
fi
local_version="$(redis-server --version | sed -n 's/.* v=\([0-9.]*\).*/\1/p')"
if [ "${local_version%%.*}" -lt 7 ] 2>/dev/null; then
    die "redis-server on PATH is $local_version; the tests need Redis 7 or later (RESP3)"
fi
say "Redis ok on $REDIS_HOST:$REDIS_PORT ($redis_version)"
say "$(cargo --version); ready"
