#!/usr/bin/env bash
# The whole CLIP measurement in one run on the GPU machine (bench/RESULTS.md has its figures).
# Build the wheels here first (bench/gpu/wheelhouse.sh), then, with the device tool:
#   run(command="bash bench/gpu/run-clip.sh", carry=[".whl"], timeout_s=600)
# Extra arguments go to bench.clip_gpu (for example --levels 1 64 512). Results land in $OUT.
set -euo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
nproc | tee -a "$out/gpu.txt"
python3 -m bench.clip_gpu --out "$out" "$@" 2>&1 | tee "$out/clip_gpu.log"
# What the servers logged about images they could not decode, and any traceback.
grep -h -i -A3 "decod\|traceback\|error" /tmp/bench-clip-*/serve-*.log 2>/dev/null | tail -80 > "$out/serve-errors.txt" || true
