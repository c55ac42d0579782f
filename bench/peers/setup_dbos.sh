#!/usr/bin/env bash
# Create .venv-dbos at the repository root with a pinned DBOS Transact, for the peer
# benchmark bench/peers/dbos_three_step.py. Idempotent; never touches .venv.
set -euo pipefail

DBOS_VERSION="3.4.0"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv-dbos"
PY="$VENV/bin/python"

installed() {
    [ -x "$PY" ] && "$PY" -c "import importlib.metadata as m; print(m.version('dbos'))" 2>/dev/null
}

if [ "$(installed || true)" = "$DBOS_VERSION" ]; then
    echo "dbos==$DBOS_VERSION already installed in $VENV" >&2
    exit 0
fi

if command -v uv >/dev/null 2>&1; then
    [ -x "$PY" ] || uv venv "$VENV"
    uv pip install --python "$PY" "dbos==$DBOS_VERSION"
else
    [ -x "$PY" ] || python3 -m venv "$VENV"
    "$PY" -m pip install --quiet --disable-pip-version-check "dbos==$DBOS_VERSION"
fi

echo "installed dbos==$(installed) in $VENV" >&2
