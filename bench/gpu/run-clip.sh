#!/usr/bin/env bash
# The whole CLIP measurement in one run on the GPU machine (bench/RESULTS.md has its figures).
# Build the wheels here first (bench/gpu/wheelhouse.sh), then, with the device tool:
#   run(command="bash bench/gpu/run-clip.sh", carry=[".whl"], timeout_s=600)
# Extra arguments go to bench.clip_gpu (for example --levels 1 64 512). Results land in $OUT.
set -euo pipefail
source "$(dirname "$0")/device-setup.sh"  # wheels installed, $out, gpu.txt
python3 -m bench.clip_gpu --out "$out" "$@" 2>&1 | tee "$out/clip_gpu.log"
# What the servers logged about images they could not decode, and any traceback.
grep -h -i -A3 "decod\|traceback\|error" /tmp/bench-clip-*/serve-*.log 2>/dev/null | tail -80 > "$out/serve-errors.txt" || true
