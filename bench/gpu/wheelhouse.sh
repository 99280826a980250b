#!/usr/bin/env bash
# Builds .whl/ (repo root, gitignored): the cp312 manylinux x86_64 wheels that the lent GPU
# machine lacks to run this project's services under `bentoml serve` -- bentoml and its
# dependency closure, transformers, pydantic(-settings), fastapi, python-multipart, redis,
# cachetools, soundfile/soxr, openai-whisper -- pinned as in requirements.txt.
# Why: the GPU machine (Python 3.12) has no network. It already has torch, numpy, pillow,
# huggingface-hub, tokenizers, aiohttp, ... (as the lending tool documents the machine); those
# are left out (EXCLUDE below) and pinned in the resolve to the versions seen there
# (DEVICE_PINS), so the closure is the one that will actually run.
# How it is used: each device run carries `.whl` and starts with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# Idempotent: it always rebuilds from scratch in a temporary folder and replaces .whl/ only
# when everything succeeded. Needs this machine's pip and PyPI. Usage: bench/gpu/wheelhouse.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
OUT=.whl

REQS=$(grep -vE '^\s*(#|$)|^(torch|torchvision|numpy|pillow|prometheus-client|tqdm|openai-whisper)==' requirements.txt)
REQS="$REQS more-itertools"   # openai-whisper's one dependency the device lacks (it has numba, tiktoken)
REQS="$REQS py-spy==0.4.1"    # the benchmark's profiler (bench/clip_gpu.py --profile-at)

# Versions seen on the GPU machine (pip list there, 2026-12-03), pinned so that resolution matches
# it: e.g. huggingface-hub 2.x would pull httpx2, python-dateutil 4.x tzdata, neither needed there.
DEVICE_PINS="huggingface-hub==1.33.0 tokenizers==0.23.2 safetensors==0.8.0 numpy==2.5.2
python-dateutil==2.9.0.post0"

# Already on the GPU machine: never carried (normalised names; nvidia-* and cuda-* too).
EXCLUDE="torch torchvision torchaudio triton numpy pillow scipy matplotlib scikit-image pytest
numba llvmlite tiktoken aiohttp aiohappyeyeballs aiosignal frozenlist multidict propcache yarl
uvloop httpx httpcore h11 anyio idna certifi requests urllib3 charset-normalizer pyyaml jinja2
markupsafe psutil packaging filelock fsspec huggingface-hub hf-xet safetensors tokenizers regex
tqdm prometheus-client typing-extensions click rich markdown-it-py mdurl pygments attrs
cloudpickle typer shellingham annotated-doc pathspec pyparsing python-dateutil six wrapt zipp
setuptools"

PLATFORM="--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/all" "$tmp/keep"
tr ' ' '\n' <<<"$DEVICE_PINS" >"$tmp/device-pins.txt"   # one per line

echo "== resolving and downloading the closure (cp312, manylinux x86_64)"
# shellcheck disable=SC2086
"$PY" -m pip download -q --disable-pip-version-check $PLATFORM -c "$tmp/device-pins.txt" \
  -d "$tmp/all" $REQS

echo "== building openai-whisper's wheel from its sdist (none on PyPI)"
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$tmp/keep" openai-whisper==20250625

echo "== leaving out what the GPU machine already has"
skip=" $(tr '\n' ' ' <<<"$EXCLUDE") " skipped=""
for f in "$tmp"/all/*.whl; do
  name=$(basename "$f" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
  if [[ "$skip" == *" $name "* || $name == nvidia-* || $name == cuda-* ]]; then
    skipped="$skipped $name"
  else
    cp "$f" "$tmp/keep/"
  fi
done
echo "   left out:$skipped" | fold -s -w 100

# One version of each package, or the device's install stops.
dups=$(ls "$tmp/keep" | cut -d- -f1 | tr 'A-Z_.' 'a-z--' | sort | uniq -d)
[[ -z "$dups" ]] || { echo "error: several versions of: $dups" >&2; exit 1; }

rm -rf "$OUT"
chmod 755 "$tmp/keep"
mv "$tmp/keep" "$OUT"
n=$(ls "$OUT"/*.whl | wc -l)
echo "== $OUT/: $n wheels, $(du -sh "$OUT" | cut -f1) in all"
