#!/usr/bin/env bash
# Run the Stable-SAM ML backend for Label Studio on this machine:
#   1. the Python environment (.venv from requirements.txt, created or updated when needed),
#   2. Redis (started if none answers on REDIS_URL; `redis-server` installed with apt-get if missing),
#   3. one RQ worker for training jobs (queue TRAINING_QUEUE),
#   4. the HTTP backend on BACKEND_HOST:BACKEND_PORT (default 0.0.0.0:9090),
# and prints how to connect it from Label Studio. Ctrl-C stops the backend, the worker (10 s to
# finish a running training job, then it is stopped) and a Redis this script started.
#
# Configuration: the environment variables of backend/settings.py (see the README), plus
# BACKEND_HOST, BACKEND_PORT and PYTHON (the interpreter that creates .venv).
# Not HOST/PORT: Label Studio reads those unprefixed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
BACKEND_HOST="${BACKEND_HOST:-0.0.0.0}"
BACKEND_PORT="${BACKEND_PORT:-9090}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
export TRAINING_QUEUE="${TRAINING_QUEUE:-stable-sam-training}"

log() { echo "[serve] $*" >&2; }

# --- stopping: whatever this script started, on Ctrl-C, TERM or exit -------------------------------
WORKER_PID=""
BACKEND_PID=""
STARTED_REDIS_PORT=""
cleanup() {
    trap - INT TERM EXIT
    log "stopping"
    [[ -n "$BACKEND_PID" ]] && kill -TERM "$BACKEND_PID" 2>/dev/null || true
    if [[ -n "$WORKER_PID" ]]; then
        # RQ: the first TERM is a warm shutdown (finish the running job), a second one a cold
        # shutdown (kill the job's work horse; RQ records the job as failed).
        kill -TERM "$WORKER_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$WORKER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -TERM "$WORKER_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$WORKER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$WORKER_PID" 2>/dev/null || true
    fi
    [[ -n "$BACKEND_PID" ]] && wait "$BACKEND_PID" 2>/dev/null || true
    if [[ -n "$STARTED_REDIS_PORT" ]]; then
        pidfile="/tmp/stable-sam-redis-$STARTED_REDIS_PORT.pid"
        [[ -f "$pidfile" ]] && kill -TERM "$(cat "$pidfile")" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM

# --- 1. Python environment ---------------------------------------------------------------------
stamp=".venv/.requirements.sha256"
want="$(sha256sum requirements.txt | cut -d' ' -f1)"
if [[ ! -x .venv/bin/python ]]; then
    log "creating .venv"
    "$PYTHON" -m venv .venv
fi
if [[ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]]; then
    log "installing requirements.txt into .venv (first run takes a while)"
    .venv/bin/pip install -r requirements.txt
    echo "$want" > "$stamp"
fi

# --- 2. Redis ----------------------------------------------------------------------------------
redis_ping() {
    .venv/bin/python - "$REDIS_URL" <<'PY' >/dev/null 2>&1
import sys, redis
redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1).ping()
PY
}
if ! redis_ping; then
    read -r redis_host redis_port < <(.venv/bin/python - "$REDIS_URL" <<'PY'
import sys
from urllib.parse import urlsplit
u = urlsplit(sys.argv[1])
print(u.hostname or "127.0.0.1", u.port or 6379)
PY
)
    if [[ "$redis_host" != "127.0.0.1" && "$redis_host" != "localhost" ]]; then
        log "no Redis answers at $REDIS_URL (a remote host: start it there)"; exit 1
    fi
    if ! command -v redis-server >/dev/null; then
        log "installing redis-server (apt-get)"
        sudo_cmd=""; [[ "$(id -u)" != 0 ]] && sudo_cmd="sudo"
        $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq redis-server
    fi
    log "starting redis-server on port $redis_port"
    redis-server --daemonize yes --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
        --pidfile "/tmp/stable-sam-redis-$redis_port.pid" >/dev/null
    for _ in $(seq 50); do redis_ping && break; sleep 0.1; done
    redis_ping || { log "redis-server did not start"; exit 1; }
    STARTED_REDIS_PORT="$redis_port"
fi


# --- 3. the training worker ----------------------------------------------------------------------
# REDIS_URL and TRAINING_QUEUE reach it through the environment (argv shows in `ps`).
.venv/bin/python -m training.worker &
WORKER_PID=$!
log "RQ worker $WORKER_PID listening on queue $TRAINING_QUEUE"

cat >&2 <<EOT

==================================================================================================
Stable-SAM backend: http://$BACKEND_HOST:$BACKEND_PORT  (from Label Studio on this machine:
http://localhost:$BACKEND_PORT)

Connect it in Label Studio:
  1. Project > Settings > Labeling Interface > Code, paste:

<View>
  <Image name="image" value="\$image" zoom="true"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Object" background="#FF4136"/>
  </BrushLabels>
  <KeyPointLabels name="point" toName="image" smart="true">
    <Label value="Object" smart="true" background="#FF4136" showInline="true"/>
  </KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true">
    <Label value="Object" smart="true" background="#FF4136" showInline="true"/>
  </RectangleLabels>
</View>

     (any tag names and labels work; keep the labels of the three tools the same)
  2. Project > Settings > Model > Connect Model: URL http://localhost:$BACKEND_PORT,
     turn on "Interactive preannotations". Optionally "Start model training on annotation
     submission".
  3. Label Studio must be allowed to call a backend on localhost: start it with
       ML_BLOCK_LOCAL_IP=false SSRF_PROTECTION_ENABLED=false label-studio start
  4. Image access (the backend downloads task images from Label Studio):
       LABEL_STUDIO_URL=http://localhost:8080 (where Label Studio runs) and
       LABEL_STUDIO_API_KEY=<your Personal Access Token: Account & Settings > Personal Access
       Token>, exported before running this script; or enable legacy API tokens in Label
       Studio (Organization > API Tokens Settings) and the token arrives with /setup.
  5. In the labeling screen: pick the smart KeyPoint or Rectangle tool (auto-annotation on),
     click or drag on the object; the mask comes back as a brush region.
Ctrl-C stops the backend and the worker.
==================================================================================================

EOT

# --- 4. the backend ------------------------------------------------------------------------------
.venv/bin/uvicorn backend.app:create_app --factory --host "$BACKEND_HOST" --port "$BACKEND_PORT" \
    --timeout-graceful-shutdown 5 &
BACKEND_PID=$!
wait "$BACKEND_PID"
