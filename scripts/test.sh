#!/usr/bin/env bash
# Set up (first run) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev  # the test extra, and ruff and mypy (.ci/run runs them)
exec .venv/bin/python -m pytest "$@"
