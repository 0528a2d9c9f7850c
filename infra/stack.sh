#!/usr/bin/env bash
# The byoai service stack on one machine, without Docker, for development and tests:
# PostgreSQL (Debian packages) -> Prefect server + MLflow server on it -> work pools -> a process worker.
#
#   infra/stack.sh start     start everything (idempotent), print the environment to use it
#   infra/stack.sh env       print the environment (eval "$(infra/stack.sh env)")
#   infra/stack.sh stop      stop everything started here
#   infra/stack.sh status
#
# Settings (environment): BYOAI_STACK_DIR (default ./.byoai/stack), BYOAI_PG_PORT (55432),
# BYOAI_PREFECT_PORT (4200), BYOAI_MLFLOW_PORT (5000), BYOAI_WORK_POOLS ("cpu"),
# BYOAI_START_WORKER (1). Everything listens on 127.0.0.1 only.
#
# Authentication is on: the Prefect server requires its API auth string, the MLflow server runs
# MLflow's basic-auth app (user `admin`; `worker`, who creates and writes runs, models and aliases;
# `viewer`, who reads). Their secrets come from the environment (BYOAI_PREFECT_AUTH_STRING as
# user:password, BYOAI_MLFLOW_ADMIN_PASSWORD, BYOAI_MLFLOW_WORKER_PASSWORD,
# BYOAI_MLFLOW_VIEWER_PASSWORD) or are generated once into $BYOAI_STACK_DIR/secrets.env (mode 600).
# `env` prints the worker's credentials for clients (MLFLOW_TRACKING_USERNAME/PASSWORD,
# PREFECT_API_AUTH_STRING): keep that output out of logs.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
stack="${BYOAI_STACK_DIR:-$root/.byoai/stack}"
pg_port="${BYOAI_PG_PORT:-55432}"
prefect_port="${BYOAI_PREFECT_PORT:-4200}"
mlflow_port="${BYOAI_MLFLOW_PORT:-5000}"
pools="${BYOAI_WORK_POOLS:-cpu}"
venv="${BYOAI_VENV:-$root/.venv}"
bin="$venv/bin"
pg_bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"

prefect_db="postgresql+asyncpg://byoai:byoai@127.0.0.1:$pg_port/prefect"
mlflow_db="postgresql://byoai:byoai@127.0.0.1:$pg_port/mlflow"

load_secrets() {
  mkdir -p "$stack"
  local file="$stack/secrets.env"
  if [ ! -f "$file" ]; then
    (umask 077
     gen() { head -c 24 /dev/urandom | base64 | tr -d '/+=' ; }
     {
       echo "BYOAI_PREFECT_AUTH_STRING='${BYOAI_PREFECT_AUTH_STRING:-byoai:$(gen)}'"
       echo "BYOAI_MLFLOW_ADMIN_PASSWORD='${BYOAI_MLFLOW_ADMIN_PASSWORD:-$(gen)}'"
       echo "BYOAI_MLFLOW_WORKER_PASSWORD='${BYOAI_MLFLOW_WORKER_PASSWORD:-$(gen)}'"
       echo "BYOAI_MLFLOW_VIEWER_PASSWORD='${BYOAI_MLFLOW_VIEWER_PASSWORD:-$(gen)}'"
       echo "BYOAI_MLFLOW_SECRET_KEY='$(gen)'"
     } >"$file")
  fi
  # shellcheck disable=SC1090
  . "$file"
}

env_lines() {
  load_secrets
  echo "export PREFECT_API_URL=http://127.0.0.1:$prefect_port/api"
  echo "export PREFECT_API_AUTH_STRING='$BYOAI_PREFECT_AUTH_STRING'"
  echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$mlflow_port"
  echo "export MLFLOW_TRACKING_USERNAME=worker MLFLOW_TRACKING_PASSWORD='$BYOAI_MLFLOW_WORKER_PASSWORD'"
  echo "export BYOAI_STACK_DIR=$stack"
}

mlflow_user() {  # name, password: created by the admin once (409 when it exists)
  curl -sS -o /dev/null -w '%{http_code}' -u "admin:$BYOAI_MLFLOW_ADMIN_PASSWORD" -H 'Content-Type: application/json' \
    -X POST "http://127.0.0.1:$mlflow_port/api/2.0/mlflow/users/create" \
    -d "{\"username\": \"$1\", \"password\": \"$2\"}" | grep -Eq '^(200|409|400)$' || {
    echo "could not create MLflow user $1; see $stack/mlflow.log" >&2; exit 1; }
}

as_postgres() {
  # initdb and postgres refuse to run as root: use the postgres account the Debian package made.
  if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi
}

wait_http() {  # url, name, seconds
  local deadline=$((SECONDS + $3))
  until curl -fsS "$1" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      echo "$2 did not answer at $1 within $3 s; see $stack/$2.log" >&2
      tail -n 30 "$stack/$2.log" >&2 || true
      exit 1
    fi
    sleep 1
  done
}

running() { [ -f "$stack/$1.pid" ] && kill -0 "$(cat "$stack/$1.pid")" 2>/dev/null; }

start_bg() {  # name, command...
  local name=$1; shift
  running "$name" && return 0
  nohup "$@" >"$stack/$name.log" 2>&1 &
  echo $! >"$stack/$name.pid"
}

start_postgres() {
  if [ -z "$pg_bin" ]; then
    echo "PostgreSQL is not installed: apt-get install -y postgresql" >&2
    exit 1
  fi
  mkdir -p "$stack/pg"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$stack" "$stack/pg"
  if [ ! -f "$stack/pg/data/PG_VERSION" ]; then
    as_postgres "$pg_bin/initdb -D '$stack/pg/data' -U postgres --auth=trust >'$stack/pg/initdb.log'"
  fi
  if ! as_postgres "$pg_bin/pg_ctl -D '$stack/pg/data' status" >/dev/null 2>&1; then
    as_postgres "$pg_bin/pg_ctl -D '$stack/pg/data' -l '$stack/pg/server.log' -w -o \"-p $pg_port -k '$stack/pg' -c listen_addresses=127.0.0.1\" start" >/dev/null
  fi
  local psql=("$pg_bin/psql" -h 127.0.0.1 -p "$pg_port" -U postgres -v ON_ERROR_STOP=1 -qtA)
  "${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname='byoai'" | grep -q 1 ||
    "${psql[@]}" -c "CREATE ROLE byoai LOGIN PASSWORD 'byoai'"
  for db in prefect mlflow; do
    "${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname='$db'" | grep -q 1 ||
      "${psql[@]}" -c "CREATE DATABASE $db OWNER byoai"
  done
}

start() {
  mkdir -p "$stack"
  load_secrets
  start_postgres
  PREFECT_API_DATABASE_CONNECTION_URL="$prefect_db" PREFECT_HOME="$stack/prefect-home" \
    PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_UI_API_URL="http://127.0.0.1:$prefect_port/api" \
    PREFECT_SERVER_API_AUTH_STRING="$BYOAI_PREFECT_AUTH_STRING" \
    start_bg prefect "$bin/prefect" server start --host 127.0.0.1 --port "$prefect_port"
  cat >"$stack/mlflow-auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = sqlite:///$stack/mlflow-auth.db
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
grant_default_workspace_access = false
INI
  # --serve-artifacts: clients upload artifacts through the server (mlflow-artifacts:/ URIs), so a
  # worker elsewhere needs only the tracking URI. Production swaps the folder for S3 (see compose).
  MLFLOW_AUTH_CONFIG_PATH="$stack/mlflow-auth.ini" MLFLOW_AUTH_ADMIN_PASSWORD="$BYOAI_MLFLOW_ADMIN_PASSWORD" \
    MLFLOW_FLASK_SERVER_SECRET_KEY="$BYOAI_MLFLOW_SECRET_KEY" \
    start_bg mlflow "$bin/mlflow" server --app-name basic-auth --backend-store-uri "$mlflow_db" \
    --artifacts-destination "$stack/mlartifacts" --serve-artifacts \
    --host 127.0.0.1 --port "$mlflow_port" --workers 1
  wait_http "http://127.0.0.1:$prefect_port/api/health" prefect 120
  wait_http "http://127.0.0.1:$mlflow_port/health" mlflow 120
  mlflow_user worker "$BYOAI_MLFLOW_WORKER_PASSWORD"
  mlflow_user viewer "$BYOAI_MLFLOW_VIEWER_PASSWORD"
  export PREFECT_API_URL="http://127.0.0.1:$prefect_port/api" PREFECT_API_AUTH_STRING="$BYOAI_PREFECT_AUTH_STRING"
  export MLFLOW_TRACKING_USERNAME=worker MLFLOW_TRACKING_PASSWORD="$BYOAI_MLFLOW_WORKER_PASSWORD"
  for pool in $pools; do
    "$bin/prefect" work-pool inspect "$pool" >/dev/null 2>&1 ||
      "$bin/prefect" work-pool create "$pool" --type process >/dev/null
  done
  # One heavy job (build or evaluation) per device kind at a time: byoai tags those tasks
  # byoai-cpu / byoai-cuda, so latency is never measured while another job loads the machine.
  for device in cpu cuda; do
    "$bin/prefect" concurrency-limit inspect "byoai-$device" >/dev/null 2>&1 ||
      "$bin/prefect" concurrency-limit create "byoai-$device" "${BYOAI_HEAVY_JOBS_PER_DEVICE:-1}" >/dev/null
  done
  if [ "${BYOAI_START_WORKER:-1}" = 1 ]; then
    for pool in $pools; do
      (cd "$root" && start_bg "worker-$pool" "$bin/prefect" worker start --pool "$pool" --type process)
    done
  fi
  env_lines
}

stop() {
  local pids=()
  for pidfile in "$stack"/*.pid; do
    [ -f "$pidfile" ] || continue
    pids+=("$(cat "$pidfile")")
    kill "${pids[-1]}" 2>/dev/null || true
    rm -f "$pidfile"
  done
  # A worker busy cancelling its flow runs can outlive SIGTERM: give them 10 s, then SIGKILL.
  for _ in $(seq 10); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 1
  done
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  if [ -n "$pg_bin" ] && [ -f "$stack/pg/data/PG_VERSION" ]; then
    as_postgres "$pg_bin/pg_ctl -D '$stack/pg/data' -m fast stop" >/dev/null 2>&1 || true
  fi
}

status() {
  for name in prefect mlflow $(for p in $pools; do echo "worker-$p"; done); do
    if running "$name"; then echo "$name: running (pid $(cat "$stack/$name.pid"))"; else echo "$name: stopped"; fi
  done
  as_postgres "$pg_bin/pg_ctl -D '$stack/pg/data' status" >/dev/null 2>&1 && echo "postgres: running (port $pg_port)" || echo "postgres: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) env_lines ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
