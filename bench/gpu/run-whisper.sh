#!/usr/bin/env bash
# The whole Whisper measurement in one run on the GPU machine (bench/RESULTS.md has its figures).
# Build the wheels and the speech here first (bench/gpu/wheelhouse.sh; python -m bench.whisper_gpu speech),
# then, with the device tool:
#   run(command="bash bench/gpu/run-whisper.sh", carry=[".whl", ".speech"], timeout_s=600)
# Extra arguments go to `bench.whisper_gpu run` (for example --steps decode --decoders static reference).
set -euo pipefail
source "$(dirname "$0")/device-setup.sh"  # wheels installed, $out, gpu.txt
timeout "${LIMIT_S:-560}" python3 -m bench.whisper_gpu run --speech .speech --out "$out" "$@" 2>&1 | tee "$out/whisper_gpu.log" || true
# What the servers logged about errors, and any traceback.
grep -h -i -B2 -A8 "traceback\|error" /tmp/bench-whisper-*/serve-*.log 2>/dev/null | tail -120 > "$out/serve-errors.txt" || true
grep -h "warmed up\|Whisper whisper" /tmp/bench-whisper-*/serve-*.log 2>/dev/null | tail -5 >> "$out/whisper_gpu.log" || true
# The device returns at most 8 files: py-spy's profiles (two a service) travel as one archive.
if compgen -G "$out/pyspy-*" > /dev/null; then
  tar czf "$out/profiles.tar.gz" -C "$out" $(cd "$out" && ls pyspy-*) && rm -f "$out"/pyspy-*
fi
