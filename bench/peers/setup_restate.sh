#!/usr/bin/env bash
# Create .venv-restate at the repository root for the peer benchmark
# bench/peers/restate_three_step.py: a virtualenv with a pinned Restate Python SDK,
# the ASGI server that serves it (Hypercorn) and the HTTP client that drives the
# ingress (aiohttp), plus the Restate server itself, a single binary that the npm
# registry distributes (installed under .venv-restate/server; npm's install scripts
# are not run). Idempotent; never touches .venv.
set -euo pipefail

SDK_VERSION="1.3.0"
SERVER_VERSION="1.7.12"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv-restate"
PY="$VENV/bin/python"
SERVER="$VENV/server/node_modules/@restatedev/restate-server-linux-x64/bin/restate-server"

installed() {
    [ -x "$PY" ] && "$PY" -c "import importlib.metadata as m; print(m.version('restate-sdk'))" 2>/dev/null
}

if [ "$(installed || true)" != "$SDK_VERSION" ]; then
    [ -x "$PY" ] || python3 -m venv "$VENV"
    "$PY" -m pip install --quiet --disable-pip-version-check \
        "restate-sdk==$SDK_VERSION" "hypercorn==0.18.0" "aiohttp==3.14.5"
fi

if [ ! -x "$SERVER" ] || [ "$("$SERVER" --version 2>/dev/null)" != "restate-server $SERVER_VERSION" ]; then
    command -v npm >/dev/null 2>&1 || { echo "npm is needed to fetch the Restate server" >&2; exit 1; }
    [ "$(uname -sm)" = "Linux x86_64" ] || { echo "only linux-x64 is set up here" >&2; exit 1; }
    npm install --silent --no-audit --no-fund --ignore-scripts --prefix "$VENV/server" \
        "@restatedev/restate-server@$SERVER_VERSION"
fi

echo "installed restate-sdk==$(installed) and $("$SERVER" --version) in $VENV" >&2
