#!/usr/bin/env bash
# Run the Stable-SAM ML backend for Label Studio on this machine:
#   1. the Python environment (.venv from requirements.txt, created or updated when needed),
#   2. Redis: REDIS_URL as given, or else a password-protected redis-server of its own on
#      127.0.0.1:SERVE_REDIS_PORT (`redis-server` installed with apt-get if missing),
#   3. one worker (`python -m training.worker`: training jobs on TRAINING_QUEUE, the box
#      conversion's on CONVERT_QUEUE),
#   4. the HTTP backend on BACKEND_HOST:BACKEND_PORT (default 0.0.0.0:9090),
# and prints how to connect it from Label Studio. Ctrl-C stops the backend, the worker (10 s to
# finish a running training job, then it is stopped) and a Redis this script started.
#
# Configuration: the environment variables of runtime/settings.py (see the README), plus
# BACKEND_HOST, BACKEND_PORT, SERVE_REDIS_PORT and PYTHON (the interpreter that creates .venv).
# Not HOST/PORT: Label Studio reads those unprefixed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
BACKEND_HOST="${BACKEND_HOST:-0.0.0.0}"
BACKEND_PORT="${BACKEND_PORT:-9090}"
SERVE_REDIS_PORT="${SERVE_REDIS_PORT:-6380}"
export TRAINING_QUEUE="${TRAINING_QUEUE:-stable-sam-training}"
export CONVERT_QUEUE="${CONVERT_QUEUE:-stable-sam-convert}"

log() { echo "[serve] $*" >&2; }

# --- stopping: whatever this script started, on Ctrl-C, TERM or exit -------------------------------
WORKER_PID=""
BACKEND_PID=""
STARTED_REDIS_PIDFILE=""
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
    if [[ -n "$STARTED_REDIS_PIDFILE" && -f "$STARTED_REDIS_PIDFILE" ]]; then
        kill -TERM "$(cat "$STARTED_REDIS_PIDFILE")" 2>/dev/null || true
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
    bash scripts/install_requirements.sh .venv/bin/pip
    echo "$want" > "$stamp"
fi

# --- 2. Redis ----------------------------------------------------------------------------------
# Whoever can write to the queue's Redis chooses what the worker runs, so it needs a password. An
# explicit REDIS_URL is used as given. Without one, this script runs its own redis-server on
# 127.0.0.1:SERVE_REDIS_PORT, never whatever answers on 6379 (on a dev machine, an
# unauthenticated system Redis): the password is generated once into data/redis/password (0600)
# and reaches redis-server in a 0600 config file, and the processes below in REDIS_URL through
# the environment, never on a command line (`ps` shows those to every user). Nothing here prints
# it: messages name host:port/db only.
redis_location() {
    .venv/bin/python - <<'PY'
import os, redis
k = redis.connection.parse_url(os.environ["REDIS_URL"])
print(f"unix:{k['path']}" if "path" in k else f"{k.get('host', '127.0.0.1')}:{k.get('port', 6379)}/{k.get('db', 0)}")
PY
}
redis_ping() {
    .venv/bin/python - <<'PY' >/dev/null 2>&1
import os, redis
redis.Redis.from_url(os.environ["REDIS_URL"], socket_connect_timeout=1).ping()
PY
}
if [[ -n "${REDIS_URL:-}" ]]; then
    export REDIS_URL
    if ! .venv/bin/python -c 'import os, redis, sys; sys.exit(not redis.connection.parse_url(os.environ["REDIS_URL"]).get("password"))'; then
        log "WARNING: REDIS_URL has no password: anyone who reaches $(redis_location) can make the worker run code"
    fi
    redis_ping || { log "no Redis answers at $(redis_location) (REDIS_URL)"; exit 1; }
else
    redis_dir="$ROOT/data/redis"
    password_file="$redis_dir/password"
    conf="$redis_dir/redis-$SERVE_REDIS_PORT.conf"
    pidfile="$redis_dir/redis-$SERVE_REDIS_PORT.pid"
    (umask 077 && mkdir -p "$redis_dir")
    chmod 700 "$redis_dir"
    if [[ ! -s "$password_file" ]]; then
        (umask 077 && .venv/bin/python -c 'import secrets; print(secrets.token_hex(32))' > "$password_file")
        log "generated a Redis password into $password_file"
    fi
    chmod 600 "$password_file"
    REDIS_URL="redis://:$(cat "$password_file")@127.0.0.1:$SERVE_REDIS_PORT/0"
    export REDIS_URL
    if ! redis_ping; then
        if ! command -v redis-server >/dev/null; then
            log "installing redis-server (apt-get)"
            sudo_cmd=""; [[ "$(id -u)" != 0 ]] && sudo_cmd="sudo"
            $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq redis-server
        fi
        (umask 077 && cat > "$conf" <<EOF
port $SERVE_REDIS_PORT
bind 127.0.0.1
protected-mode yes
requirepass $(cat "$password_file")
daemonize yes
pidfile $pidfile
logfile $redis_dir/redis-$SERVE_REDIS_PORT.log
dir $redis_dir
save ""
appendonly $([[ "${VERSIONS_STORE:-local}" == redis ]] && echo yes || echo no)
EOF
)
        chmod 600 "$conf"
        log "starting redis-server on 127.0.0.1:$SERVE_REDIS_PORT (password in $password_file)"
        redis-server "$conf" >/dev/null
        for _ in $(seq 50); do redis_ping && break; sleep 0.1; done
        redis_ping || {
            log "redis-server did not answer on 127.0.0.1:$SERVE_REDIS_PORT with this password (port taken? set SERVE_REDIS_PORT; log: $redis_dir/redis-$SERVE_REDIS_PORT.log)"
            exit 1
        }
        STARTED_REDIS_PIDFILE="$pidfile"
    fi
fi
log "training queue $TRAINING_QUEUE on Redis $(redis_location)"

# --- 3. the training worker ----------------------------------------------------------------------
# REDIS_URL and the queue names reach it through the environment (argv shows in `ps`).
.venv/bin/python -m training.worker &
WORKER_PID=$!
log "worker $WORKER_PID listening on queues $TRAINING_QUEUE and $CONVERT_QUEUE"

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
       Studio (Organization > API Tokens Settings) and export LABEL_STUDIO_TRUST_SETUP=true:
       the token then arrives with /setup (see "Who gets the credentials" in the README).
  5. In the labeling screen: pick the smart KeyPoint or Rectangle tool (auto-annotation on),
     click or drag on the object; the mask comes back as a brush region.
  6. Boxes already in a project (a crowd's, a detector's) to masks, for the whole project:
       curl -X POST http://localhost:$BACKEND_PORT/convert -H 'Content-Type: application/json' -d '{"project": <id>}'
     and follow it with GET /convert/<id> (README: "Crowd boxes to masks").
Ctrl-C stops the backend and the worker.
==================================================================================================

EOT

# --- 4. the backend ------------------------------------------------------------------------------
.venv/bin/uvicorn backend.app:create_app --factory --host "$BACKEND_HOST" --port "$BACKEND_PORT" \
    --timeout-graceful-shutdown 5 &
BACKEND_PID=$!
wait "$BACKEND_PID"
