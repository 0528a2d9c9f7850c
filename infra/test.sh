#!/usr/bin/env bash
# The test command (make test): install, start the service stack, run pytest, stop the stack.
# Arguments go to pytest. BYOAI_TEST_STACK=0 runs without the stack (its tests are skipped).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash infra/install.sh
if [ "${BYOAI_TEST_STACK:-1}" = 1 ]; then
  bash infra/system-packages.sh
  # Its own folder and ports, so a developer's running stack (infra/stack.sh) is left alone.
  export BYOAI_STACK_DIR="${BYOAI_TEST_STACK_DIR:-$root/.byoai/test-stack}"
  export BYOAI_PG_PORT="${BYOAI_TEST_PG_PORT:-55433}" BYOAI_PREFECT_PORT="${BYOAI_TEST_PREFECT_PORT:-4201}" BYOAI_MLFLOW_PORT="${BYOAI_TEST_MLFLOW_PORT:-5001}"
  started=$(date +%s)
  eval "$(bash infra/stack.sh start)"
  echo "service stack up in $(( $(date +%s) - started )) s"
  trap 'bash infra/stack.sh stop' EXIT
  # The stack's tests read these; everything else keeps its own (temporary) Prefect and MLflow.
  export BYOAI_STACK_PREFECT_API_URL="$PREFECT_API_URL" BYOAI_STACK_MLFLOW_URI="$MLFLOW_TRACKING_URI"
  unset PREFECT_API_URL MLFLOW_TRACKING_URI
  # The credentials stay in the environment (the stack's tests use them; local stores ignore them);
  # the viewer's password is for the test that checks what a read-only user may not do.
  export BYOAI_MLFLOW_VIEWER_PASSWORD="$(. "$BYOAI_STACK_DIR/secrets.env"; echo "$BYOAI_MLFLOW_VIEWER_PASSWORD")"
fi
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest "$@"
