#!/usr/bin/env bash
# Start the team's MLflow tracking server (`tracking=server`, conf/tracking/server.yaml):
# `mlflow server` on a PostgreSQL backend store, serving artifacts itself (clients upload
# and download them through the server; they never see the artifact destination).
#
#   bash deploy/mlflow/up.sh [extra `mlflow server` options, e.g. --allowed-hosts ...]
#
# Run it as often as you like: a server this script started that answers /health is left
# alone. Stop it with deploy/mlflow/down.sh (same environment).
#
# Environment (all optional):
#   FORGE_MLFLOW_PORT         port on 127.0.0.1 (default 5055); conf/tracking/server.yaml
#                             reads the same variable
#   FORGE_MLFLOW_HOST         interface to bind (default 127.0.0.1)
#   FORGE_MLFLOW_BACKEND_URL  backend store (default
#                             postgresql+psycopg://postgres@127.0.0.1:5432/forge_mlflow);
#                             a PostgreSQL database that is missing is created
#   FORGE_MLFLOW_DIR          the server's folder: pid file, log, artifacts (default
#                             $FORGE_HOME/mlflow-server; FORGE_HOME defaults to ./outputs)
#   FORGE_MLFLOW_ARTIFACTS    --artifacts-destination (default $FORGE_MLFLOW_DIR/artifacts)
#   FORGE_MLFLOW_WAIT_S       how long to wait for /health (default 60)
#   MLFLOW_BIN                the mlflow CLI (default .venv/bin/mlflow of this checkout)
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
HOST="${FORGE_MLFLOW_HOST:-127.0.0.1}"
PORT="${FORGE_MLFLOW_PORT:-5055}"
BACKEND="${FORGE_MLFLOW_BACKEND_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/forge_mlflow}"
HOME_DIR="${FORGE_HOME:-$REPO/outputs}"
DIR="${FORGE_MLFLOW_DIR:-$HOME_DIR/mlflow-server}"
ARTIFACTS="${FORGE_MLFLOW_ARTIFACTS:-$DIR/artifacts}"
WAIT_S="${FORGE_MLFLOW_WAIT_S:-60}"
MLFLOW="${MLFLOW_BIN:-$REPO/.venv/bin/mlflow}"
PYTHON="$(dirname "$MLFLOW")/python"  # the interpreter beside the CLI: SQLAlchemy + psycopg
PID_FILE="$DIR/server.pid"
LOG="$DIR/server.log"
URL="http://$([[ $HOST == 0.0.0.0 ]] && echo 127.0.0.1 || echo "$HOST"):$PORT"

healthy() {
  if command -v curl >/dev/null; then
    curl -fsS -o /dev/null --max-time 2 "$URL/health" 2>/dev/null
  else
    "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
      "$URL/health" >/dev/null 2>&1
  fi
}

# The pid in the pid file, if that process is alive and is an mlflow server.
running_pid() {
  local pid
  [[ -f $PID_FILE ]] || return 1
  pid="$(cat "$PID_FILE")"
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "mlflow.* server" || return 1
  echo "$pid"
}

fail() {
  echo "mlflow server: $1" >&2
  if [[ -f $LOG ]]; then
    echo "--- last lines of $LOG ---" >&2
    tail -n 40 "$LOG" >&2
  fi
  exit 1
}

[[ -x $MLFLOW ]] || fail "no mlflow CLI at $MLFLOW (run \`make demo\` or set MLFLOW_BIN)"
mkdir -p "$DIR"
[[ $ARTIFACTS == *://* ]] || mkdir -p "$ARTIFACTS"  # a local folder (not s3://...)
# One up.sh at a time per folder: two at once would both start a server and one pid file.
exec 9>"$DIR/up.lock"
flock 9

if pid="$(running_pid)"; then
  if healthy; then
    echo "mlflow server already running at $URL (pid $pid, log $LOG)"
    exit 0
  fi
  echo "mlflow server (pid $pid) is starting; waiting for $URL/health"
elif healthy; then
  fail "$URL already answers, but not a server started from $DIR: stop it or set FORGE_MLFLOW_PORT"
else
  # A PostgreSQL backend store: create its database when it is missing (MLflow creates the
  # tables itself on first start).
  if [[ $BACKEND == postgresql* ]]; then
    "$PYTHON" - "$BACKEND" <<'EOF' || fail "cannot reach or create the backend database"
import sys

import sqlalchemy as sa

url = sa.engine.make_url(sys.argv[1])
admin = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT",
                         poolclass=sa.pool.NullPool)
with admin.connect() as conn:
    if conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"),
                    {"n": url.database}).scalar() is None:
        conn.exec_driver_sql(f'CREATE DATABASE "{url.database}"')
        print(f"created database {url.database}")
EOF
  fi
  echo "starting mlflow server at $URL (backend $(sed -E 's#(//[^:@/]*):[^@/]*@#\1:***@#' <<<"$BACKEND"), artifacts $ARTIFACTS)"
  # Its own session (setsid): down.sh stops the CLI and uvicorn's worker as one group.
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true \
    setsid "$MLFLOW" server --backend-store-uri "$BACKEND" --host "$HOST" --port "$PORT" \
      --workers 1 --serve-artifacts --artifacts-destination "$ARTIFACTS" "$@" \
      </dev/null >"$LOG" 2>&1 9>&- &
  pid=$!
  echo "$pid" >"$PID_FILE"
fi

deadline=$((SECONDS + WAIT_S))
until healthy; do
  kill -0 "$pid" 2>/dev/null || { rm -f "$PID_FILE"; fail "exited before it answered"; }
  ((SECONDS < deadline)) || fail "no answer from $URL/health after ${WAIT_S}s (pid $pid still running; deploy/mlflow/down.sh stops it)"
  sleep 0.5
done
echo "mlflow server ready at $URL (pid $pid, log $LOG)"
