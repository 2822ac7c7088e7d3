#!/usr/bin/env bash
# Set up (idempotent) and run the test suite. Used by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[dev,eval]"
python -m ruff check .
exec python -m pytest -q "$@"
