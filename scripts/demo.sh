#!/usr/bin/env bash
# Set up the machine, build Orrery, start every long-running process of the
# Procfile (API, one worker per queue, scheduler, the Ambari emulator) in the
# background, create an operator account, and request a 3-node cluster through
# the REST API while you watch its task: local containers are allocated, agents
# bootstrapped over SSH, the cluster created in Ambari, accounts made. The
# cluster is then shown and (without --keep) terminated.
#
#   scripts/demo.sh           provision a cluster, show it, terminate it, stop everything
#   scripts/demo.sh --keep    leave the cluster and the processes running, until Ctrl-C
#
# Where local containers are impossible (not root, no namespaces) it says why
# and runs the engine's `demo` workflow instead.
# Logs: .orrery/logs/<process>.log. Exit status: 0 only if the cluster (or the
# fallback run) succeeded.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"

KEEP=0
for arg in "$@"; do
    case "$arg" in
        --keep) KEEP=1 ;;
        -h | --help)
            sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "demo: unknown argument '$arg' (try --help)" >&2
            exit 2
            ;;
    esac
done

say() { printf '\ndemo: %s\n' "$*"; }
die() { printf 'demo: ERROR: %s\n' "$*" >&2; exit 1; }

READY_TIMEOUT=60   # seconds for the API to become ready
WATCH_TIMEOUT=600  # seconds for the demo run to finish
STOP_TIMEOUT=20    # seconds for the processes to exit after SIGTERM

# ---------------------------------------------------------------- setup, build

bash scripts/setup.sh

# rustup's cargo lives in ~/.cargo/bin (or /usr/lib/rustup/bin with Debian's
# rustup package), which a fresh shell may not have on PATH.
for dir in /usr/lib/rustup/bin "${CARGO_HOME:-$HOME/.cargo}/bin"; do
    if [ -d "$dir" ]; then PATH="$dir:$PATH"; fi
done

say "building (cargo build --release --workspace)"
cargo build --release --workspace
BIN="$ROOT/target/release"
PATH="$BIN:$PATH"
export PATH

export ORRERY_NAMESPACE="${ORRERY_NAMESPACE:-orrery}"
API_ADDR="${ORRERY_API_ADDR:-127.0.0.1:8080}"
API_HOST="${API_ADDR%:*}"
API_PORT="${API_ADDR##*:}"
case "$API_HOST" in 0.0.0.0 | "[::]" | "") API_HOST=127.0.0.1 ;; esac
API_URL="http://$API_HOST:$API_PORT"

LOGS="$ROOT/.orrery/logs"
mkdir -p "$LOGS"

# The command-line client logs to stderr; keep it quiet unless RUST_LOG says otherwise.
orrery_cli() { RUST_LOG="${RUST_LOG:-warn}" "$BIN/orrery" "$@"; }

# ---------------------------------------------------------------- Procfile

RELEASE=""
NAMES=()
COMMANDS=()
while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in "" | "#"*) continue ;; esac
    name="${line%%:*}"
    cmd="${line#*:}"
    cmd="${cmd#"${cmd%%[![:space:]]*}"}"
    if [ "$name" = release ]; then
        RELEASE="$cmd"
    else
        NAMES+=("$name")
        COMMANDS+=("$cmd")
    fi
done <Procfile

# Run a Procfile command line (plain words, no shell syntax) from target/release.
procfile_argv() {
    read -r -a ARGV <<<"$1"
    ARGV[0]="$BIN/${ARGV[0]}"
}

if [ -n "$RELEASE" ]; then
    say "release: $RELEASE"
    procfile_argv "$RELEASE"
    "${ARGV[@]}" || die "'$RELEASE' failed: is PostgreSQL reachable at ${ORRERY_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/orrery}?"
fi

# ---------------------------------------------------------------- machines

# Agents in the containers report to the emulator on the bridge address.
export ORRERY_AMBARI_URL="${ORRERY_AMBARI_URL:-http://127.0.0.1:8081}"
export ORRERY_AMBARI_AGENT_SERVER="${ORRERY_AMBARI_AGENT_SERVER:-10.77.0.1}"
export ORRERY_AMBARI_AGENT_PORT="${ORRERY_AMBARI_AGENT_PORT:-8440}"
export ORRERY_AMBARI_POLL_MS="${ORRERY_AMBARI_POLL_MS:-500}"
CLUSTERS=1
say "preparing local containers: orrery infra prepare"
if prep_out="$(orrery_cli infra prepare 2>&1)"; then
    echo "  $prep_out"
else
    CLUSTERS=0
    echo "demo: local containers are not possible on this machine, so no cluster can be provisioned:" >&2
    echo "  $prep_out" >&2
    echo "demo: the engine's demonstration workflow runs instead" >&2
fi

# ---------------------------------------------------------------- processes

PIDS=()
PID_NAMES=()
FINAL_STATUS=""
STOPPED=0

stop_all() {
    [ "$STOPPED" -eq 0 ] || return 0
    STOPPED=1
    [ "${#PIDS[@]}" -gt 0 ] || return 0
    say "stopping ${PID_NAMES[*]}"
    kill -TERM "${PIDS[@]}" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_TIMEOUT)) alive
    while :; do
        alive=()
        for pid in "${PIDS[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive+=("$pid")
        done
        [ "${#alive[@]}" -gt 0 ] || break
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "demo: still running after ${STOP_TIMEOUT}s, killing: ${alive[*]}" >&2
            kill -KILL "${alive[@]}" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    wait "${PIDS[@]}" 2>/dev/null || true
}
trap stop_all EXIT
trap 'exit "${FINAL_STATUS:-130}"' INT
trap 'exit "${FINAL_STATUS:-143}"' TERM

# A process that already listens on the API address would answer /readyz for us.
if timeout 2 bash -c "exec 3<>/dev/tcp/$API_HOST/$API_PORT" 2>/dev/null; then
    die "something already listens on $API_HOST:$API_PORT (an orrery-api or 'orrery dev' still running?); stop it or set ORRERY_API_ADDR"
fi

say "starting the Procfile's processes (ORRERY_NAMESPACE=$ORRERY_NAMESPACE)"
for i in "${!NAMES[@]}"; do
    name="${NAMES[$i]}"
    procfile_argv "${COMMANDS[$i]}"
    if [ ! -x "${ARGV[0]}" ]; then
        echo "  $name: skipped (no ${ARGV[0]#"$ROOT/"})"
        continue
    fi
    if [ "$name" = ambari ] && [ "$CLUSTERS" -eq 0 ]; then
        echo "  $name: skipped (no container bridge for its agent port)"
        continue
    fi
    NO_COLOR=1 "${ARGV[@]}" >"$LOGS/$name.log" 2>&1 &
    PIDS+=("$!")
    PID_NAMES+=("$name")
    printf '  %-18s pid %-7s %s  > .orrery/logs/%s.log\n' "$name" "$!" "${COMMANDS[$i]}" "$name"
done
[ "${#PIDS[@]}" -gt 0 ] || die "no process of the Procfile could be started"

show_logs() {
    for name in "${PID_NAMES[@]}"; do
        echo "--- .orrery/logs/$name.log (last lines)"
        tail -n 15 "$LOGS/$name.log" || true
    done
}

say "waiting for $API_URL/readyz (at most ${READY_TIMEOUT}s)"
deadline=$((SECONDS + READY_TIMEOUT))
until curl -fsS -m 2 "$API_URL/readyz" >/dev/null 2>&1; do
    for i in "${!PIDS[@]}"; do
        if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
            show_logs >&2
            die "${PID_NAMES[$i]} exited during start-up (see .orrery/logs/${PID_NAMES[$i]}.log)"
        fi
    done
    if [ "$SECONDS" -ge "$deadline" ]; then
        show_logs >&2
        die "the API did not become ready within ${READY_TIMEOUT}s"
    fi
    sleep 0.5
done
echo "  $(curl -fsS -m 2 "$API_URL/readyz")"

# ---------------------------------------------------------------- the demo

finish() {
    if [ "$KEEP" -eq 1 ]; then
        say "--keep: processes keep running (API on $API_URL); Ctrl-C to stop them"
        wait || true
    fi
    exit "$FINAL_STATUS"
}

if [ "$CLUSTERS" -eq 0 ]; then
    INPUT='{"hosts":3,"work_ms":300}'
    say "submitting: orrery run submit demo '$INPUT'"
    RUN_ID="$(orrery_cli run submit demo "$INPUT")"
    say "watching: orrery run watch $RUN_ID"
    set +e
    orrery_cli run watch "$RUN_ID" --timeout "$WATCH_TIMEOUT"
    FINAL_STATUS=$?
    set -e
    echo "result: demo run $RUN_ID $([ "$FINAL_STATUS" -eq 0 ] && echo succeeded || echo 'did NOT succeed')"
    finish
fi

say "creating the operator 'demo': orrery admin create-user demo --operator"
if ! out="$(orrery_cli admin create-user demo --operator 2>&1)"; then
    out="$(orrery_cli admin create-key demo 2>&1)" || die "cannot get an API key for 'demo': $out"
fi
KEY="$(printf '%s\n' "$out" | sed -n 's/.*(shown once): *//p' | head -n 1)"
[ -n "$KEY" ] || die "no API key in: $out"
echo "  API key issued (stored hashed; shown once)"

api() {  # api METHOD PATH [BODY]: sets $STATUS, $HEADERS and $RESP (the body)
    local method=$1 path=$2 body=${3:-}
    local args=(-sS -m 30 -X "$method" -H "Authorization: Bearer $KEY" -D "$LOGS/.headers" -o "$LOGS/.body" -w '%{http_code}')
    if [ -n "$body" ]; then args+=(-H 'Content-Type: application/json' -d "$body"); fi
    STATUS="$(curl "${args[@]}" "$API_URL$path")"
    HEADERS="$(tr -d '\r' <"$LOGS/.headers")"
    RESP="$(cat "$LOGS/.body")"
}
field() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p" | head -n 1; }

watch_task() {  # watch_task TASK_ID WHAT
    say "watching the task: orrery run watch $1"
    set +e
    orrery_cli run watch "$1" --timeout "$WATCH_TIMEOUT"
    FINAL_STATUS=$?
    set -e
    if [ "$FINAL_STATUS" -ne 0 ]; then
        show_logs >&2
        echo "result: $2 did NOT succeed; details: target/release/orrery run show $1"
        finish
    fi
}

BODY='{"name":"demo","size":3,"services":["PIG"]}'
say "requesting a cluster: POST /v1/clusters $BODY"
api POST /v1/clusters "$BODY"
[ "$STATUS" = 202 ] || die "POST /v1/clusters answered $STATUS: $RESP"
TASK="$(printf '%s\n' "$HEADERS" | sed -n 's#^[Ll]ocation: */v1/tasks/##p')"
CLUSTER="$(printf '%s' "$RESP" | field cluster_id)"
echo "  202 Accepted, Location: /v1/tasks/$TASK (cluster $CLUSTER)"
watch_task "$TASK" "provisioning cluster $CLUSTER"

say "the cluster: GET /v1/clusters/$CLUSTER"
api GET "/v1/clusters/$CLUSTER"
printf '%s\n' "$RESP"

if [ "$KEEP" -eq 0 ]; then
    say "terminating it: DELETE /v1/clusters/$CLUSTER"
    api DELETE "/v1/clusters/$CLUSTER"
    [ "$STATUS" = 202 ] || die "DELETE /v1/clusters/$CLUSTER answered $STATUS: $RESP"
    TASK="$(printf '%s\n' "$HEADERS" | sed -n 's#^[Ll]ocation: */v1/tasks/##p')"
    watch_task "$TASK" "terminating cluster $CLUSTER"
fi
echo
echo "logs:   $LOGS/{$(IFS=,; echo "${PID_NAMES[*]}")}.log"
echo "result: cluster $CLUSTER was provisioned$([ "$KEEP" -eq 0 ] && echo ' and terminated')"
finish
