# Sourced by the bench/gpu/run-*.sh scripts on the GPU machine: the carried wheels installed
# (bench/gpu/wheelhouse.sh built them; the machine has no network), $out ready for results, and
# the GPU and core count recorded beside them.
out=${OUT:-bench/results}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
nproc | tee -a "$out/gpu.txt"
