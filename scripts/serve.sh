#!/usr/bin/env bash
# Set up (first run), prepare the demo models if they are missing, and serve on routes.yaml,
# which launches both backends. Extra arguments go to `python -m proxy serve`;
# CONFIG=other.yaml picks another routes file.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh demo
config=${CONFIG:-routes.yaml}
# The demo models, when the routes file launches them (routes.yaml and routes.ramp.yaml do).
if grep -q 'models/smollm2' "$config"; then
  .venv/bin/python scripts/prepare_demo_models.py --out models
fi
exec .venv/bin/python -m proxy serve --config "$config" "$@"
