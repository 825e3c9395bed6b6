#!/usr/bin/env bash
# Stop the MLflow tracking server deploy/mlflow/up.sh started (found by its pid file, in the
# same FORGE_MLFLOW_DIR / FORGE_HOME). The database and the artifacts stay.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
DIR="${FORGE_MLFLOW_DIR:-${FORGE_HOME:-$REPO/outputs}/mlflow-server}"
PID_FILE="$DIR/server.pid"

if [[ ! -f $PID_FILE ]]; then
  echo "no mlflow server started from $DIR (no $PID_FILE)"
  exit 0
fi
pid="$(cat "$PID_FILE")"
# Only the process up.sh started: alive, and still an mlflow server (not a recycled pid).
if ! [[ $pid =~ ^[0-9]+$ ]] || ! kill -0 "$pid" 2>/dev/null ||
    ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "mlflow.* server"; then
  echo "mlflow server (pid $pid) is not running"
  rm -f "$PID_FILE"
  exit 0
fi

# up.sh started it in its own session: the group is the CLI, uvicorn and its worker.
for sig in TERM KILL; do
  kill -s "$sig" -- "-$pid" 2>/dev/null || true
  for _ in $(seq 40); do
    kill -0 "$pid" 2>/dev/null || break 2
    sleep 0.25
  done
done
if kill -0 "$pid" 2>/dev/null; then
  echo "mlflow server (pid $pid) did not stop" >&2
  exit 1
fi
rm -f "$PID_FILE"
echo "mlflow server (pid $pid) stopped"
