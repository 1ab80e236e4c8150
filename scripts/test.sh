#!/usr/bin/env bash
# The test command (README; .ci/run calls exactly this). On a fresh machine it:
#   1. creates .venv from requirements.txt (torch/torchvision install from this machine's disk;
#      scripts/install_requirements.sh: sam2's sdist is built without build isolation),
#   2. installs redis-server with apt-get if missing and starts one on 127.0.0.1:6379 if none answers
#      (tests also start private servers of their own), and haproxy (the replicas' proxy),
#   3. installs label-studio==1.23.2 into its own .venv-ls for the end-to-end tests,
#   4. runs ruff and the whole pytest suite (unit, integration with real Redis and RQ workers,
#      end-to-end against a real Label Studio). Extra arguments go to pytest.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
log() { echo "[test] $*" >&2; }
quiet_pip() { "$@" 2> >(grep -v "^WARNING: Location '" >&2); }

# 1. Python environment, reinstalled only when requirements.txt changes.
stamp=".venv/.requirements.sha256"
want="$(sha256sum requirements.txt | cut -d' ' -f1)"
[[ -x .venv/bin/python ]] || { log "creating .venv"; "$PYTHON" -m venv .venv; }
if [[ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]]; then
    log "installing requirements.txt into .venv"
    quiet_pip bash scripts/install_requirements.sh .venv/bin/pip
    echo "$want" > "$stamp"
fi

# 2. Redis.
if ! command -v redis-server >/dev/null 2>&1; then
    log "installing redis-server (Debian package)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >&2
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    log "starting redis-server on 127.0.0.1:6379"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
        --logfile /tmp/stable-sam-redis-6379.log >/dev/null
fi

# HAProxy, the replicas' proxy of deploy/haproxy.cfg, for the two-host tests.
if ! command -v haproxy >/dev/null 2>&1; then
    log "installing haproxy (Debian package)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy) >&2
fi

# 3. Label Studio for the end-to-end tests.
bash scripts/install_label_studio.sh

# 4. Lint and tests.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
