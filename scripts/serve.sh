#!/usr/bin/env bash
# Set up (first run), prepare the demo models if they are missing, and serve on routes.yaml,
# which launches both backends. Extra arguments go to `python -m proxy serve`;
# CONFIG=other.yaml picks another routes file.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh demo
[ -n "${CONFIG:-}" ] || .venv/bin/python scripts/prepare_demo_models.py --out models
exec .venv/bin/python -m proxy serve --config "${CONFIG:-routes.yaml}" "$@"
