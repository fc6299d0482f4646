#!/usr/bin/env bash
# The one prepared GPU run (../shared/BENCHMARKING.md): on a CUDA machine with torch, triton and
# the test tools already installed and no package registry, install pep_kernels without
# dependencies, run the CUDA tests, then time Triton against the baselines. Finishes in about
# 5 minutes on an H200. Results go to $OUT (default /tmp/pep_gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/pep_gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
status=0

echo "== install (no deps, no build isolation)"
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -n 5 || status=1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

echo "== CUDA tests (Triton kernels on the GPU, compile parity, opcheck with fake tensors)"
timeout 240 python3 -m pytest tests -q -x -p no:cacheprovider \
  -k "triton or gpu or registration or modules" 2>&1 | tee "$out/gpu_tests.log" | tail -n 15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== GPU benchmarks"
timeout 240 python3 benchmarks/bench_gpu.py --out "$out/gpu_bench.md" || status=1
exit $status
