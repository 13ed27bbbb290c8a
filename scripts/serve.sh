#!/usr/bin/env bash
# Set up (first run) and start the proxy on routes.yaml. Extra arguments go to `serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e .
exec .venv/bin/python -m proxy serve --config "${CONFIG:-routes.yaml}" "$@"
