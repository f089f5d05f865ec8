#!/usr/bin/env bash
# A two-node Ray cluster on one machine: a head node and a second raylet with its own resources,
# token authentication on, the dashboard (and the Jobs API) bound to 127.0.0.1 only.
#
#   cluster/local.sh start          head + one worker node; prints how to submit jobs
#   cluster/local.sh add-worker     one more worker node (e.g. to replace one that died)
#   cluster/local.sh status         `ray status` of this cluster
#   cluster/local.sh token          print the auth token (for Authorization: Bearer <token>)
#   cluster/local.sh stop           stop only the nodes this script started (never `ray stop`)
#
# Each node is one `ray start --block` in its own session; its pid goes to $STATE_DIR/<node>.pid.
# `stop` signals those process groups only, so other Ray instances on the machine are left alone.
#
# Settings (environment variables, defaults in brackets):
#   DISTILL_LOCAL_DIR   state dir: Ray temp dir, pid files, logs       [/tmp/distill-ray-local]
#   GCS_PORT            head GCS port                                   [6390]
#   DASHBOARD_PORT      dashboard + Jobs API on 127.0.0.1               [8275]
#   CLIENT_PORT         Ray Client server port                          [10201]
#   AGENT_PORT          head dashboard-agent HTTP port                  [52375]
#   HEAD_CPUS / WORKER_CPUS                                             [2 / 2]
#   HEAD_RESOURCES / WORKER_RESOURCES  custom resources as JSON  [{"head_node": 1} / {"worker_node": 1}]
#   OBJECT_STORE_MEMORY bytes per node (unset: Ray's default)
#   RAY_AUTH_TOKEN_PATH token file; created if missing. Unset: ~/.ray/auth_token
#                       (created with `ray get-auth-token --generate` if missing)
#   RAY                 the ray executable        [.venv/bin/ray of this checkout, else `ray`]
#   STOP_WAIT_S         `stop`: seconds the nodes get to stop on SIGTERM before SIGKILL   [20]
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="${DISTILL_LOCAL_DIR:-/tmp/distill-ray-local}"
GCS_PORT="${GCS_PORT:-6390}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8275}"
CLIENT_PORT="${CLIENT_PORT:-10201}"
AGENT_PORT="${AGENT_PORT:-52375}"
HEAD_CPUS="${HEAD_CPUS:-2}"
WORKER_CPUS="${WORKER_CPUS:-2}"
STOP_WAIT_S="${STOP_WAIT_S:-20}"
DEFAULT_HEAD_RESOURCES='{"head_node": 1}'
DEFAULT_WORKER_RESOURCES='{"worker_node": 1}'
HEAD_RESOURCES="${HEAD_RESOURCES:-$DEFAULT_HEAD_RESOURCES}"
WORKER_RESOURCES="${WORKER_RESOURCES:-$DEFAULT_WORKER_RESOURCES}"
if [[ -z "${RAY:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/ray" ]]; then RAY="$REPO/.venv/bin/ray"; else RAY=ray; fi
fi
RAY_TMP="$STATE_DIR/ray"
# Job entrypoints say `python ...`: make that the interpreter Ray itself runs on.
RAY_BIN_DIR="$(dirname "$(command -v "$RAY")")"
export PATH="$RAY_BIN_DIR:$PATH"

# Token authentication for every process of every node (and anything they spawn).
export RAY_AUTH_MODE=token
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

die() { echo "local.sh: $*" >&2; exit 1; }

ensure_token() {
  if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
    return
  fi
  if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
      mkdir -p "$(dirname "$RAY_AUTH_TOKEN_PATH")"
      (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$RAY_AUTH_TOKEN_PATH")
    fi
  elif [[ ! -s "$HOME/.ray/auth_token" ]]; then
    "$RAY" get-auth-token --generate >/dev/null
  fi
}

token() {
  if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
    printf '%s' "$RAY_AUTH_TOKEN"
  else
    cat "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
  fi
}

running() {  # running PID: alive and not a zombie
  local pid="$1" state
  kill -0 "$pid" 2>/dev/null || return 1
  if [[ -r "/proc/$pid/stat" ]]; then
    state="$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)"
    [[ "$state" != Z ]] || return 1
  fi
}

alive() {  # alive NODE: its `ray start --block` is running
  local pidfile="$STATE_DIR/$1.pid"
  [[ -f "$pidfile" ]] && running "$(cat "$pidfile")"
}

launch() {  # launch NODE ARGS...: one `ray start --block` in its own session (process group)
  # Each node gets its own Ray temp dir: nodes sharing one would share a session directory, and
  # their runtime-env agents would unpack the same working_dir package into the same place at
  # the same time (a job's driver then sees files vanish mid-import).
  local node="$1"; shift
  mkdir -p "$STATE_DIR/logs"
  setsid "$RAY" start --block --disable-usage-stats --temp-dir "$RAY_TMP/$node" \
    ${OBJECT_STORE_MEMORY:+--object-store-memory "$OBJECT_STORE_MEMORY"} "$@" \
    >"$STATE_DIR/logs/$node.out" 2>&1 < /dev/null &
  echo $! > "$STATE_DIR/$node.pid"
}

wait_started() {  # wait_started NODE: until its `ray start` has joined the cluster
  for _ in $(seq 1 240); do
    if grep -q "Ray runtime started" "$STATE_DIR/logs/$1.out" 2>/dev/null; then return 0; fi
    alive "$1" || die "node $1 exited while starting; see $STATE_DIR/logs/$1.out"
    sleep 0.5
  done
  die "node $1 did not start in 120s; see $STATE_DIR/logs/$1.out"
}

start_head() {
  alive head && die "a head started by this script is already running (pid $(cat "$STATE_DIR/head.pid")); run '$0 stop' first"
  mkdir -p "$STATE_DIR"
  ensure_token
  launch head --head --port "$GCS_PORT" \
    --ray-client-server-port "$CLIENT_PORT" \
    --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
    --dashboard-agent-listen-port "$AGENT_PORT" \
    --num-cpus "$HEAD_CPUS" --num-gpus 0 --resources "$HEAD_RESOURCES"
  for _ in $(seq 1 120); do
    # The Jobs API is up and accepts our token (without it every route answers 401).
    if curl -sf -H "Authorization: Bearer $(token)" "http://127.0.0.1:$DASHBOARD_PORT/api/version" \
        >/dev/null 2>&1; then return 0; fi
    alive head || die "the head node exited; see $STATE_DIR/logs/head.out"
    sleep 1
  done
  die "the dashboard did not come up on 127.0.0.1:$DASHBOARD_PORT; see $STATE_DIR/logs/head.out"
}

add_worker() {
  alive head || die "no head node from this script is running; run '$0 start'"
  local i=1
  while [[ -e "$STATE_DIR/worker-$i.pid" ]]; do i=$((i + 1)); done
  launch "worker-$i" --address "127.0.0.1:$GCS_PORT" \
    --dashboard-agent-listen-port 0 --num-cpus "$WORKER_CPUS" --num-gpus 0 --resources "$WORKER_RESOURCES"
  wait_started "worker-$i"
  echo "worker-$i"
}

stop_nodes() {
  local f pid pids=() waiting
  [[ -d "$STATE_DIR" ]] || return 0
  # `ray start --block` stops its own node's processes on SIGTERM: signal every node at once
  # (worker nodes first), then wait for all of them.
  for f in $(ls "$STATE_DIR"/worker-*.pid 2>/dev/null) "$STATE_DIR/head.pid"; do
    [[ -e "$f" ]] || continue
    pid="$(cat "$f")"
    pids+=("$pid")
    if running "$pid"; then
      kill -TERM "$pid" 2>/dev/null || true
      echo "stopping $(basename "$f" .pid) (pid $pid)"
    fi
  done
  for _ in $(seq 1 $((STOP_WAIT_S * 2))); do
    waiting=0
    for pid in "${pids[@]}"; do running "$pid" && waiting=1; done
    [[ "$waiting" == 1 ]] || break
    sleep 0.5
  done
  # Whatever is left of each node's process group (agents, a stuck raylet) goes too.
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  rm -f "$STATE_DIR"/head.pid "$STATE_DIR"/worker-*.pid
}

case "${1:-start}" in
  start)
    start_head
    add_worker >/dev/null
    cat <<EOF
Ray is up: 2 nodes (head: $HEAD_CPUS CPUs $HEAD_RESOURCES, worker: $WORKER_CPUS CPUs $WORKER_RESOURCES).
  dashboard / Jobs API: http://127.0.0.1:$DASHBOARD_PORT (token required)
  GCS address:          127.0.0.1:$GCS_PORT
Submit from this checkout:
  export RAY_AUTH_MODE=token${RAY_AUTH_TOKEN_PATH:+ RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH}
  ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --working-dir . \\
      -- python jobs/distill.py --config jobs/configs/laptop.yaml
Stop: $0 stop
EOF
    ;;
  add-worker) add_worker ;;
  status) "$RAY" status --address "127.0.0.1:$GCS_PORT" ;;
  token) token; echo >&2 ;;
  stop) stop_nodes ;;
  *) die "usage: $0 [start|add-worker|status|token|stop]" ;;
esac
