#!/usr/bin/env bash
# The one prepared GPU run (../shared/BENCHMARKING.md): on a CUDA machine with torch, triton and
# the test tools already installed and no package registry, install pep_kernels without
# dependencies, then run the GPU checks, most wanted first, each with a time limit inside one
# overall budget (CHECK_BUDGET_S, default 450 s): a C++ error raised through torch, the CUDA tests
# (the Triton kernels, CUDA graphs, reduce-overhead compile, no syncs), the device and its peak, the
# lookup, the training step, serving, and the profile. Every table is printed in
# benchmarks/RESULTS.md form; logs, the tables and benchmarks/data/*.csv with the new rows go to
# $OUT (default /tmp/pep_gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/pep_gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
deadline=$((SECONDS + ${CHECK_BUDGET_S:-450}))
status=0

# stage NAME MAX_SECONDS COMMAND...: runs COMMAND for at most MAX_SECONDS or what is left of the
# budget, logs to $out/NAME.log, prints the log's tail (the tables are at the end of each bench log).
stage() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  local left=$((deadline - SECONDS))
  ((limit > left)) && limit=$left
  if ((limit < 20)); then
    echo "== $name: skipped, ${left} s of the budget left"
    status=1
    return 1
  fi
  echo "== $name ($(date -u +%T), at most ${limit} s)"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  tail -n 45 "$out/$name.log"
  echo "-- $name: exit $rc after $((SECONDS - start)) s"
  ((rc == 0)) || status=1
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# If the CUDA store does not build, build without it so that the Triton checks still run.
stage install 200 python3 -m pip install -v --no-build-isolation --no-deps -e . ||
  PEP_KERNELS_CUDA=0 stage install_no_cuda_store 150 python3 -m pip install -v --no-build-isolation --no-deps -e . ||
  exit 1
# A C++ op's error message with a number in it. One image's compiler (/opt/gcc) came with a newer
# libstdc++ than the one the process loads, and formatting the number crashed (SIGSEGV); the
# compiler's own libstdc++, preloaded, is the one the extension was built against.
cxx_error='import torch, pep_kernels
try:
    torch.ops.pep_kernels.row_optimizer_step([torch.zeros(2, 2)] * 3 + [torch.zeros(2, dtype=torch.long)],
        torch.tensor([0]), torch.zeros(1, 2), torch.zeros(4, 9), "adam", [1e-3, 1e-8, 0.0, 0.9, 0.999], 0)
except ValueError as error:
    print("C++ error raised as ValueError:", error)'
if ! stage cxx_error 30 python3 -c "$cxx_error"; then
  ${CXX:-c++} --version | head -n 1
  ldd pep_kernels/_C*.so | grep -E "stdc|gomp|gcc_s"
  libstdcxx=$(${CXX:-c++} -print-file-name=libstdc++.so.6)
  if [ -f "$libstdcxx" ] && LD_PRELOAD=$libstdcxx stage cxx_error_preloaded 30 python3 -c "$cxx_error"; then
    export LD_PRELOAD=$libstdcxx
    echo "the remaining stages preload $libstdcxx"
  fi
fi
parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")  # pytest-xdist, where installed
stage tests 150 python3 -m pytest tests -q -p no:cacheprovider $parallel --maxfail=10 -rfE \
  -k "triton or gpu or cuda or registration or modules or bag or optim" --ignore=tests/test_cmake.py
stage lookup 110 python3 benchmarks/bench_gpu.py device lookup
stage step 100 python3 benchmarks/bench_gpu.py device step
stage serve 40 python3 benchmarks/bench_gpu.py serve
stage profile 40 python3 benchmarks/bench_gpu.py profile
cp -r benchmarks/data "$out/benchmarks_data"
echo "== done at $(date -u +%T), exit $status"
exit $status
