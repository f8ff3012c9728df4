#!/bin/sh
# install.sh SERVER [PORT]: install Orrery's ambari-agent stand-in on this
# host and point it at the Ambari emulator's agent port (default 8440).
# Copies ambari-agent (from this folder, or $AMBARI_AGENT_SOURCE, which may
# be /dev/stdin) to /usr/sbin/ambari-agent and writes
# /etc/ambari-agent/conf/ambari-agent.ini. Safe to re-run; nothing is started
# (run `ambari-agent restart` afterwards, as one would with the real agent).
#
# The bootstrap step runs this on every host of a cluster at once, and on the
# local provider those hosts share this machine's cores: every process spawned
# here costs CPU on all of them, so shell built-ins are used where a command
# is not needed (one `install`, a `mkdir` only when a folder is missing).
#
# Overrides: AMBARI_AGENT_PREFIX (folder of the command, /usr/sbin),
# AMBARI_AGENT_CONF (the ini path).
set -eu

if [ $# -lt 1 ] || [ -z "$1" ]; then
    echo "usage: install.sh SERVER [PORT]" >&2
    exit 2
fi
SERVER=$1
PORT=${2:-8440}
case $PORT in '' | *[!0-9]*) echo "install.sh: port must be a number, not '$PORT'" >&2; exit 2 ;; esac
case $SERVER in *[!A-Za-z0-9.:_-]*) echo "install.sh: bad server name '$SERVER'" >&2; exit 2 ;; esac

if [ -n "${AMBARI_AGENT_SOURCE:-}" ]; then
    SOURCE=$AMBARI_AGENT_SOURCE
else
    case $0 in */*) SOURCE=${0%/*}/ambari-agent ;; *) SOURCE=./ambari-agent ;; esac
fi
PREFIX=${AMBARI_AGENT_PREFIX:-/usr/sbin}
CONF=${AMBARI_AGENT_CONF:-/etc/ambari-agent/conf/ambari-agent.ini}
case $CONF in */*) CONF_DIR=${CONF%/*} ;; *) CONF_DIR=. ;; esac

[ -r "$SOURCE" ] || { echo "install.sh: cannot read $SOURCE" >&2; exit 1; }
[ -d "$PREFIX" ] && [ -d "$CONF_DIR" ] || mkdir -p "$PREFIX" "$CONF_DIR"

# `install` unlinks the old file before writing the new one, so an agent
# running the old script (sh reads it as it goes) keeps its own copy.
install -m 0755 "$SOURCE" "$PREFIX/ambari-agent"

printf '%s\n' \
    "; Written by Orrery's install.sh (the keys are the real ambari-agent's)." \
    "[server]" \
    "hostname=$SERVER" \
    "url_port=$PORT" \
    "secured_url_port=$PORT" \
    "" \
    "[agent]" \
    "heartbeat_interval_seconds=${AMBARI_AGENT_HEARTBEAT_INTERVAL:-5}" >"$CONF"
echo "ambari-agent installed in $PREFIX, server $SERVER:$PORT ($CONF)"
