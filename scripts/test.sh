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
[ "$rc" -eq 0 ] || exit "$rc"
# Jetson images run Python 3.10: the package must at least compile and import there.
if [ -z "${PYTEST_ADDOPTS:-}" ] && [ "$#" -eq 0 ]; then
  PY310_OFFLINE=1 bash scripts/check_py310.sh || exit 1
fi
