#!/bin/sh
# install.sh SERVER [PORT]: install Orrery's ambari-agent stand-in on this
# host and point it at the Ambari emulator's agent port (default 8440).
# Copies ambari-agent (from this folder, or $AMBARI_AGENT_SOURCE) to
# /usr/sbin/ambari-agent and writes /etc/ambari-agent/conf/ambari-agent.ini.
# Safe to re-run: files are replaced atomically, nothing is started (run
# `ambari-agent restart` afterwards, as one would with the real agent).
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

SOURCE=${AMBARI_AGENT_SOURCE:-$(cd "$(dirname "$0")" && pwd)/ambari-agent}
PREFIX=${AMBARI_AGENT_PREFIX:-/usr/sbin}
CONF=${AMBARI_AGENT_CONF:-/etc/ambari-agent/conf/ambari-agent.ini}

[ -r "$SOURCE" ] || { echo "install.sh: cannot read $SOURCE" >&2; exit 1; }
mkdir -p "$PREFIX" "$(dirname "$CONF")"

cp "$SOURCE" "$PREFIX/.ambari-agent.tmp.$$"
chmod 0755 "$PREFIX/.ambari-agent.tmp.$$"
mv -f "$PREFIX/.ambari-agent.tmp.$$" "$PREFIX/ambari-agent"

cat >"$CONF.tmp.$$" <<INI
; Written by Orrery's install.sh (the keys are the real ambari-agent's).
[server]
hostname=$SERVER
url_port=$PORT
secured_url_port=$PORT

[agent]
heartbeat_interval_seconds=${AMBARI_AGENT_HEARTBEAT_INTERVAL:-5}
INI
mv -f "$CONF.tmp.$$" "$CONF"
echo "ambari-agent installed in $PREFIX, server $SERVER:$PORT ($CONF)"
