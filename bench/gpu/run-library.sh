#!/usr/bin/env bash
# The image library on the GPU machine (bench/RESULTS.md, "Image library"), in one run:
#   1. the embedded store alone, 1M synthetic 768-d vectors, search on the GPU (torch) at 1/16/64 clients;
#   2. the product served (bentoml serve, ViT-L/14 random weights): photographs added through HTTP
#      (images/s), then 1M synthetic vectors loaded into that collection, then text-to-image search
#      through HTTP at 1/16/64/256 clients (QPS, p50, p99), and vector search beside it.
# Build the wheels here first (bench/gpu/wheelhouse.sh: nothing beyond what the CLIP run carries),
# then, with the device tool:
#   run(command="bash bench/gpu/run-library.sh", carry=[".whl"], timeout_s=600)
# STEPS="store" or STEPS="served" runs one part; extra arguments go to both. SOCKETS="own shared" serves
# twice, with each worker's own listening socket and with BentoML's shared one. Results land in $OUT.
set -euo pipefail
source "$(dirname "$0")/device-setup.sh"  # wheels installed, $out, gpu.txt
for step in ${STEPS:-store served}; do
  case $step in
    store) python3 -m bench.library store --stores embedded --search-device cuda --vectors 1000000 --duration 10 --warmup 3 \
             --out "$out" --name library_store_h200 "$@" 2>&1 | tee "$out/library_store.log" ;;
    served)
      for sockets in ${SOCKETS:-own}; do  # SOCKETS="own shared": also with BentoML's one shared listening socket
        MULTIMODAL_OWN_LISTENING_SOCKETS=$([ "$sockets" = own ] && echo true || echo false) \
          python3 -m bench.library served --search-device cuda --vectors 1000000 --gateway-workers 8 --clip-workers 2 \
            --client-processes 6 --duration 8 --warmup 4 --out "$out" --name "library_served_h200_$sockets" "$@" 2>&1 \
          | tee "$out/library_served_$sockets.log"
      done
      if [ "${SOCKETS:-own}" = "own shared" ]; then
        python3 -m bench.library plot "own socket per worker=$out/library_served_h200_own.json" \
          "one shared socket (BentoML)=$out/library_served_h200_shared.json" --out "$out" --name library_served_h200_sockets
      fi ;;
  esac
done
# What the servers logged about errors, and any traceback.
grep -h -i -A3 "traceback\|error" /tmp/bench-library-served-*/serve*.log 2>/dev/null | tail -80 > "$out/serve-errors.txt" || true
