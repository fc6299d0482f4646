#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the C++ kernels.
#
#   bash tools/sanitize.sh            # about 9 min the first time on 2 cores, 2 min when rebuilt
#   PEP_SANITIZE_CMAKE=0 bash tools/sanitize.sh   # skip the CMake C++ test
#
# 1. Copies the sources into build/sanitize/src (the normal in-place build is untouched; timestamps
#    are kept, so a rerun recompiles only what changed) and builds pep_kernels._C there with
#    -fsanitize=address,undefined (UB is fatal: -fno-sanitize-recover).
# 2. Runs the C++-backed tests against that build, with libasan preloaded into Python (which is
#    not itself instrumented) and leak detection off (CPython and torch keep memory until exit
#    by design): tests/test_soft_threshold.py -k cpu (AVX2 kernels, then again with
#    PEP_KERNELS_DISABLE_AVX2=1 for the base kernels), tests/test_optim.py,
#    tests/test_bad_input.py, tests/test_store.py (the sparse-row store), and the cpu/optimizer property tests of tests/test_properties.py.
# 3. Builds the CMake library and its C++ test (tests/cpp) with the same sanitizers and runs ctest.
#
# Any sanitizer report aborts the process, so a clean run is: every step passes.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${PEP_SANITIZE_DIR:-$ROOT/build/sanitize}
SRC=$WORK/src
PYTHON=${PYTHON:-python}
SAN_FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g1"
LIBASAN=$(gcc -print-file-name=libasan.so)
[ -e "$LIBASAN" ] || { echo "libasan.so not found (gcc -print-file-name=libasan.so gave $LIBASAN)"; exit 1; }

# libstdc++ is preloaded too: Python is a C program, so without it ASan finds no __cxa_throw to
# intercept at start-up and aborts on the first C++ exception (a CHECK failure, not a finding).
PRELOAD="$LIBASAN $(gcc -print-file-name=libstdc++.so.6)"
# Reports go to files (pytest captures stderr, which is lost when a sanitizer aborts the process).
REPORTS=$WORK/reports
rm -rf "$REPORTS" && mkdir -p "$REPORTS"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:log_path=$REPORTS/asan}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1:log_path=$REPORTS/ubsan}
reports() { if compgen -G "$REPORTS/*" > /dev/null; then echo "sanitizer reports:"; head -100 "$REPORTS"/*; return 1; fi; }
start=$(date +%s)
step() { echo "== [$(( $(date +%s) - start )) s] $*"; }

step "copying sources to $SRC"
mkdir -p "$SRC"
(cd "$ROOT" && cp -a setup.py pyproject.toml README.md CMakeLists.txt csrc pep_kernels tests "$SRC"/)
rm -f "$SRC"/pep_kernels/_C*.so  # the normal build's library: relink the instrumented one (objects are cached)
find "$SRC" -name __pycache__ -type d -prune -exec rm -rf {} +

step "building pep_kernels._C with $SAN_FLAGS"
(cd "$SRC" && CFLAGS="$SAN_FLAGS" CXXFLAGS="$SAN_FLAGS" LDFLAGS="$SAN_FLAGS" MAX_JOBS=${MAX_JOBS:-2} \
    PEP_KERNELS_CUDA=0 "$PYTHON" setup.py -q build_ext --inplace --build-temp "$WORK/temp" > "$WORK/build.log" 2>&1) \
    || { tail -50 "$WORK/build.log"; exit 1; }
SO=$(ls "$SRC"/pep_kernels/_C*.so)
SYMBOLS=$(nm -D "$SO")  # (not piped into grep -q: with pipefail, nm's SIGPIPE would fail the check)
grep -q __asan_report <<< "$SYMBOLS" || { echo "$SO is not instrumented (no __asan_report symbols)"; exit 1; }
grep -q __ubsan_handle <<< "$SYMBOLS" || { echo "$SO has no UBSan handlers"; exit 1; }

run_pytest() {
  step "pytest $*"
  (cd "$SRC" && LD_PRELOAD="$PRELOAD" PYTHONPATH="$SRC" "$PYTHON" -m pytest -q -p no:cacheprovider -x "$@") \
    || { reports; exit 1; }
  reports
}
run_pytest tests/test_soft_threshold.py -k cpu
PEP_KERNELS_DISABLE_AVX2=1 run_pytest tests/test_soft_threshold.py -k cpu
# Deselected: it runs nvcc, which inherits the preloaded libasan and crashes (not our code).
run_pytest tests/test_optim.py tests/test_bad_input.py tests/test_store.py \
  --deselect tests/test_store.py::test_cuda_source_compiles
if [ -e "$SRC/tests/test_properties.py" ]; then
  run_pytest tests/test_properties.py -k "cpu or optimizer"
fi

if [ "${PEP_SANITIZE_CMAKE:-1}" = 1 ] && command -v cmake > /dev/null; then
  step "CMake build of libpep_kernels and tests/cpp with the sanitizers"
  TORCH_PREFIX=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
  cmake -S "$SRC" -B "$WORK/cmake" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
      -DCMAKE_CXX_FLAGS="$SAN_FLAGS" -DCMAKE_EXE_LINKER_FLAGS="$SAN_FLAGS" -DCMAKE_SHARED_LINKER_FLAGS="$SAN_FLAGS" \
      > "$WORK/cmake.log" 2>&1 || { tail -50 "$WORK/cmake.log"; exit 1; }
  cmake --build "$WORK/cmake" -j"${MAX_JOBS:-2}" >> "$WORK/cmake.log" 2>&1 || { tail -50 "$WORK/cmake.log"; exit 1; }
  step "ctest"
  ctest --test-dir "$WORK/cmake" --output-on-failure || { reports; exit 1; }
  reports
fi
step "clean: no sanitizer report"
