#!/usr/bin/env bash
# Inspect or remove the local provider's containers by hand, without the
# database (for when the platform is down or its inventory is gone). The
# platform itself never calls this: it does the same from Rust
# (workflows/src/infra/local/container.rs); see docs/INFRA.md for the layout.
#
#   orrery-containers.sh [-s STATE_DIR] list
#   orrery-containers.sh [-s STATE_DIR] destroy NAME...
#   orrery-containers.sh [-s STATE_DIR] destroy-prefix PREFIX
#
# STATE_DIR defaults to $ORRERY_LOCAL_STATE_DIR or /var/lib/orrery/containers.
set -euo pipefail

state=${ORRERY_LOCAL_STATE_DIR:-/var/lib/orrery/containers}
if [ "${1:-}" = "-s" ]; then state=$2; shift 2; fi

die() { printf 'orrery-containers: %s\n' "$*" >&2; exit 1; }

launcher() {  # the live launcher pid of container $1, if any
    local dir=$state/$1 pid
    pid=$(cat "$dir/pid" 2>/dev/null) || return 0
    if tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qx -e "$dir" -e "$dir/init.sh"; then
        echo "$pid"
    fi
}

list() {
    printf '%-32s %-16s %-8s %s\n' NAME ADDRESS STATE CLUSTER
    for dir in "$state"/*/; do
        [ -d "$dir" ] || continue
        local name; name=$(basename "$dir")
        local st=stopped
        [ -n "$(launcher "$name")" ] && st=running
        printf '%-32s %-16s %-8s %s\n' "$name" "$(cat "$dir/address" 2>/dev/null || echo '?')" \
            "$st" "$(cat "$dir/cluster" 2>/dev/null || echo '-')"
    done
    for ns in /run/netns/orr-*; do
        [ -e "$ns" ] || continue
        local name=${ns#/run/netns/orr-}
        [ -d "$state/$name" ] || printf '%-32s %-16s %-8s %s\n' "$name" '?' 'stray-ns' '-'
    done
}

destroy() {
    local name=$1 dir=$state/$1 pids
    pids="$(launcher "$name") $(ip netns pids "orr-$name" 2>/dev/null || true)"
    if [ -n "${pids// /}" ]; then
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
    fi
    for _ in $(seq 100); do
        [ -z "$(ip netns pids "orr-$name" 2>/dev/null)" ] && break
        sleep 0.05
    done
    ip netns del "orr-$name" 2>/dev/null || true
    if [ -f "$dir/veth" ]; then ip link del "$(cat "$dir/veth")" 2>/dev/null || true; fi
    rm -rf -- "$dir"
    echo "destroyed $name"
}

[ "$(id -u)" -eq 0 ] || die "must run as root"
case "${1:-}" in
    list) list ;;
    destroy) shift; [ $# -gt 0 ] || die "destroy NAME..."; for n in "$@"; do destroy "$n"; done ;;
    destroy-prefix)
        [ -n "${2:-}" ] || die "destroy-prefix PREFIX"
        for dir in "$state/$2"*/; do [ -d "$dir" ] && destroy "$(basename "$dir")"; done ;;
    *) sed -n '2,12p' "$0"; exit 2 ;;
esac
