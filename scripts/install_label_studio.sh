#!/usr/bin/env bash
# Install label-studio (the real server, for end-to-end tests) into its own virtual environment,
# .venv-ls, so its pins never fight the backend's requirements (.venv).
#
# Idempotent: when .venv-ls already holds the requested version this returns in well under a
# second. Override the version with LABEL_STUDIO_VERSION, the location with LABEL_STUDIO_VENV.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${LABEL_STUDIO_VERSION:-1.23.2}"
VENV="${LABEL_STUDIO_VENV:-$ROOT/.venv-ls}"
PYTHON="${PYTHON:-python3}"

installed_version() {
    # Reads the installed distribution's metadata without importing Django.
    "$VENV/bin/python" - <<'PY' 2>/dev/null || true
from importlib.metadata import PackageNotFoundError, version
try:
    print(version("label-studio"))
except PackageNotFoundError:
    pass
PY
}

if [[ -x "$VENV/bin/label-studio" && "$(installed_version)" == "$VERSION" ]]; then
    echo "label-studio $VERSION already installed in $VENV"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
# pip warns once per package about index locations it cannot read on some machines; drop
# only that noise and keep every other message.
quiet_pip() {
    "$VENV/bin/python" -m pip "$@" 2> >(grep -v "^WARNING: Location '" >&2)
}
quiet_pip install --quiet --upgrade pip
quiet_pip install --quiet "label-studio==$VERSION"

got="$(installed_version)"
if [[ "$got" != "$VERSION" ]]; then
    echo "label-studio install failed: wanted $VERSION, found '${got:-nothing}' in $VENV" >&2
    exit 1
fi
echo "label-studio $VERSION installed in $VENV"
