#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite; extra arguments go to pytest.
# Fails when any test fails and when no test ran (pytest exit code 5).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || { echo "test: setup failed" >&2; exit 1; }
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test: no tests were collected - failing" >&2
  exit 1
fi
exit "$rc"
