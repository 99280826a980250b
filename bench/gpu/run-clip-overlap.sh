#!/usr/bin/env bash
# The in-process overlap probe of CLIP's preparation and model (bench/clip_overlap.py), one device run:
#   run(command="bash bench/gpu/run-clip-overlap.sh", carry=[".whl"], timeout_s=600)
set -euo pipefail
source "$(dirname "$0")/device-setup.sh"  # wheels installed, $out, gpu.txt
python3 -m bench.clip_overlap --out "$out" "$@" 2>&1 | tee "$out/clip_overlap.log"
