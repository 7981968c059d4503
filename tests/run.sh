#!/usr/bin/env bash
# Sets up .venv (if needed) with the pinned requirements and this package (editable),
# then runs the test suite.
#   bash tests/run.sh                # whole suite (what CI runs)
#   bash tests/run.sh -m faults      # extra args go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
.venv/bin/python -m pip install --quiet --no-deps -e .
export TF_CPP_MIN_LOG_LEVEL=2
# Pytest exits 5 when it collects no test: that is a failure here too.
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
