#!/usr/bin/env bash
# `make serve` / `make stop`: a real Prefect server on 127.0.0.1, a process work pool, every deployment in
# prefect.yaml, and a worker. `stop` ends exactly the process groups `start` created, by the PIDs it saved.
#   scripts/serve.sh start|stop|status
# Settings (environment): PREFECT_PORT (4200), SERVE_DIR (runs/.serve: PIDs and logs),
# CLIPGEN_WORK_POOL (clipgen-process), PREFECT_HOME (where the server keeps its database).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
PORT=${PREFECT_PORT:-4200}
SERVE_DIR=${SERVE_DIR:-runs/.serve}
export CLIPGEN_WORK_POOL=${CLIPGEN_WORK_POOL:-clipgen-process}
export CLIPGEN_ROOT=$PWD
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
mkdir -p "$SERVE_DIR"

alive() { [[ -f "$SERVE_DIR/$1.pid" ]] && kill -0 "$(cat "$SERVE_DIR/$1.pid")" 2>/dev/null; }

# Start a command in its own session (process group = its PID), logging to SERVE_DIR/NAME.log.
launch() {
  local name=$1; shift
  setsid "$@" >"$SERVE_DIR/$name.log" 2>&1 < /dev/null &
  echo $! >"$SERVE_DIR/$name.pid"
}

wait_healthy() {
  for _ in $(seq 1 120); do
    if "$BIN/python" -c "import sys, urllib.request as u; sys.exit(u.urlopen('$PREFECT_API_URL/health', timeout=2).status != 200)" 2>/dev/null; then
      return 0
    fi
    alive server || { echo "the Prefect server exited; see $SERVE_DIR/server.log" >&2; tail -20 "$SERVE_DIR/server.log" >&2; return 1; }
    sleep 1
  done
  echo "the Prefect server did not answer on $PREFECT_API_URL within 120 s; see $SERVE_DIR/server.log" >&2
  return 1
}

stop_one() {
  local name=$1 pid
  [[ -f "$SERVE_DIR/$name.pid" ]] || return 0
  pid=$(cat "$SERVE_DIR/$name.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -TERM -- "-$pid" 2>/dev/null || true  # the worker wants a second signal
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "stopped $name (process group $pid)"
  fi
  rm -f "$SERVE_DIR/$name.pid"
}

case "${1:-}" in
  start)
    if alive server || alive worker; then echo "already running (PIDs in $SERVE_DIR); run: make stop" >&2; exit 1; fi
    launch server "$BIN/prefect" server start --host 127.0.0.1 --port "$PORT"
    wait_healthy
    "$BIN/prefect" work-pool create "$CLIPGEN_WORK_POOL" --type process --overwrite >/dev/null
    "$BIN/prefect" --no-prompt deploy --all >"$SERVE_DIR/deploy.log" 2>&1 || { cat "$SERVE_DIR/deploy.log" >&2; exit 1; }
    launch worker "$BIN/prefect" worker start --pool "$CLIPGEN_WORK_POOL"
    echo "Prefect UI: http://127.0.0.1:$PORT  (work pool $CLIPGEN_WORK_POOL; logs and PIDs in $SERVE_DIR)"
    echo "run: PREFECT_API_URL=$PREFECT_API_URL $BIN/prefect deployment run clip-gen/shapes --watch"
    ;;
  stop)
    stop_one worker
    stop_one server
    ;;
  status)
    for name in server worker; do
      if alive "$name"; then echo "$name running (PID $(cat "$SERVE_DIR/$name.pid"))"; else echo "$name stopped"; fi
    done
    ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
