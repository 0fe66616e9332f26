#!/usr/bin/env bash
# Does the project still work on Python 3.10 (JetPack 6 ships 3.10)? A quick check, < 2 minutes.
#
#   scripts/check_py310.sh            # from the repo root or anywhere
#
# What it checks, in a throw-away venv made with the 3.10 interpreter:
#   1. every .py file in vrex sim server benchmarks tests compiles under 3.10 (catches 3.11+ syntax:
#      except*, PEP 695 generics, 3.12 f-strings);
#   2. a scan for 3.11+ standard-library names (tomllib, typing.Self, enum.StrEnum, datetime.UTC,
#      asyncio.TaskGroup/timeout, ExceptionGroup, ...) in the same files;
#   3. every module of vrex, sim, server, benchmarks is imported. torch==2.9.1 is installed only if a
#      cp310 wheel lies on local disk (/opt/wheels, PIP_FIND_LINKS); the other small binary deps
#      (numpy, pyyaml, simpy, pillow, protobuf, grpcio...) come from the package index unless
#      PY310_OFFLINE=1. A module whose import stops on a
#      missing third-party package (torch, transformers, grpc, ...) is reported SKIP, not FAIL.
# What it cannot check: code paths that only run after `import torch` succeeds, and the tests
# themselves (they are compiled and scanned, not run).
#
# Env: PY310 (interpreter, default /root/.pyenv/versions/3.10.13/bin/python, then python3.10 on PATH),
#      PY310_OFFLINE=1 (no index access), PY310_DEPS (default: numpy pyyaml simpy pillow protobuf grpcio grpcio-health-checking grpcio-reflection),
#      REQUIRE_PY310=1 (fail instead of skip when no 3.10 interpreter exists).
# Exit: 0 all good (or skipped), 1 a FAIL.
set -euo pipefail

cd "$(dirname "$0")/.."
START_S=$(date +%s)
PY310="${PY310:-/root/.pyenv/versions/3.10.13/bin/python}"
if [[ ! -x "$PY310" ]]; then
    PY310="$(command -v python3.10 || true)"
fi
if [[ -z "$PY310" ]]; then
    echo "check_py310: SKIPPED: no Python 3.10 interpreter (set PY310=/path/to/python3.10)"
    [[ "${REQUIRE_PY310:-0}" == "1" ]] && exit 1
    exit 0
fi
echo "check_py310: using $("$PY310" -VV | head -n 1) ($PY310)"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PY310" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
PACKAGES=(vrex sim server benchmarks)
COMPILE_DIRS=()
for d in "${PACKAGES[@]}" tests; do [[ -d "$d" ]] && COMPILE_DIRS+=("$d"); done

# 1. Syntax. Byte code goes to a temp prefix, never into the work tree.
echo "check_py310: compiling ${COMPILE_DIRS[*]}"
if ! PYTHONPYCACHEPREFIX="$WORK/pycache" "$VPY" -m compileall -q "${COMPILE_DIRS[@]}"; then
    echo "check_py310: FAIL: the files above do not compile under Python 3.10"
    exit 1
fi

# 3a. Dependencies: torch only from local disk, and only the version JetPack-era users pin.
TORCH="no"
if timeout 60 "$VPY" -m pip install --quiet --no-index --find-links /opt/wheels \
    ${PIP_FIND_LINKS:+--find-links "$PIP_FIND_LINKS"} torch==2.9.1 >/dev/null 2>&1; then
    TORCH="torch==2.9.1 (local wheel)"
fi
DEFAULT_DEPS="numpy pyyaml simpy pillow protobuf grpcio grpcio-health-checking grpcio-reflection"
DEPS="no (PY310_OFFLINE=1)"
if [[ "${PY310_OFFLINE:-0}" != "1" ]]; then
    # shellcheck disable=SC2086
    if timeout 90 "$VPY" -m pip install --quiet --only-binary :all: ${PY310_DEPS:-$DEFAULT_DEPS} \
        >"$WORK/pip.log" 2>&1; then
        DEPS="${PY310_DEPS:-$DEFAULT_DEPS}"
    else
        DEPS="no (pip failed or timed out: $(tail -n 1 "$WORK/pip.log"))"
    fi
fi
echo "check_py310: torch: $TORCH; other deps: $DEPS"

# 2 + 3b. Scan and import, in the 3.10 venv.
STATUS=0
"$VPY" - "${COMPILE_DIRS[@]}" <<'EOF' || STATUS=$?
import importlib
import pathlib
import re
import sys
import traceback

ours = {"vrex", "sim", "server", "benchmarks", "tests"}
# Names that exist only from Python 3.11 on (3.12 for the last ones).
NEW_NAMES = [
    (r"^\s*import tomllib|^\s*from tomllib\b", "tomllib (3.11)"),
    (r"from typing import [^\n]*\b(Self|Never|LiteralString|NotRequired|Required|assert_never|reveal_type)\b", "typing name from 3.11"),
    (r"\btyping\.(Self|Never|LiteralString|NotRequired|Required|assert_never|reveal_type)\b", "typing name from 3.11"),
    (r"\b(enum\.)?StrEnum\b", "enum.StrEnum (3.11)"),
    (r"\bdatetime\.UTC\b|from datetime import [^\n]*\bUTC\b", "datetime.UTC (3.11)"),
    (r"\basyncio\.(TaskGroup|timeout|timeout_at|Runner)\b", "asyncio 3.11 API"),
    (r"\bExceptionGroup\b|\bexcept\s*\*", "exception groups (3.11)"),
    (r"\bhashlib\.file_digest\b", "hashlib.file_digest (3.11)"),
    (r"\bitertools\.batched\b|\btyping\.override\b|from typing import [^\n]*\boverride\b", "3.12 API"),
]
failures = []
for root in sys.argv[1:]:
    for path in sorted(pathlib.Path(root).rglob("*.py")):
        if "_pb2" in path.name:
            continue
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if line.lstrip().startswith("#"):
                continue
            for pattern, what in NEW_NAMES:
                if re.search(pattern, line):
                    failures.append(f"{path}:{lineno}: uses {what}: {line.strip()[:90]}")

ok, skipped = [], []
sys.path.insert(0, ".")
for package in ("vrex", "sim", "server", "benchmarks"):
    if not pathlib.Path(package).is_dir():
        continue
    for path in sorted(pathlib.Path(package).rglob("*.py")):
        parts = list(path.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        try:
            importlib.import_module(name)
            ok.append(name)
        except ModuleNotFoundError as exc:
            missing = (exc.name or "?").split(".")[0]
            if missing in ours:
                failures.append(f"import {name}: {exc}")
            else:
                skipped.append(f"{name} (needs {missing})")
        except Exception:
            failures.append(f"import {name}:\n" + traceback.format_exc(limit=3))

print(f"check_py310: imported OK ({len(ok)}): {' '.join(ok)}")
if skipped:
    print(f"check_py310: SKIP, missing third-party package ({len(skipped)}): {', '.join(skipped)}")
for failure in failures:
    print(f"check_py310: FAIL {failure}")
sys.exit(1 if failures else 0)
EOF
echo "check_py310: done in $(($(date +%s) - START_S)) s"
exit $STATUS
