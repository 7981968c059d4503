#!/usr/bin/env bash
# Sets up .venv (if needed) with the pinned requirements and this package (editable),
# then runs the test suite.
#   bash tests/run.sh                # whole suite (what CI runs)
#   bash tests/run.sh -m faults      # extra args go to pytest
#   PYTEST_WORKERS=0 bash tests/run.sh   # one process, no xdist
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
# Two workers (pytest-xdist) for the 2-core CI machine: a test is mostly one busy
# core (XLA compiles are single-threaded, TF and JAX start-up), and a test that waits
# on a subprocess waits on a core that subprocess keeps busy, so a third worker adds
# contention and memory (each worker holds its own TF + JAX) rather than overlap.
# --dist loadgroup keeps each file on one worker and the multi-process and fault
# tests in one serial group (tests/conftest.py). PYTEST_WORKERS=N for another machine.
WORKERS=${PYTEST_WORKERS:-2}
XDIST=()
if [ "$WORKERS" != 0 ]; then
  XDIST=(-n "$WORKERS" --dist loadgroup)
fi
# Pytest exits 5 when it collects no test: that is a failure here too.
.venv/bin/python -m pytest -q -p no:cacheprovider "${XDIST[@]}" "$@" tests
