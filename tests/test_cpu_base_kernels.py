"""The CPU kernels without AVX2 (the build for older CPUs) pass the same parity tests."""

import os
import subprocess
import sys
from pathlib import Path


def run_without_avx2(test_file, selection):
    env = dict(os.environ, PEP_KERNELS_DISABLE_AVX2="1")
    tests = Path(__file__).resolve().parent
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / test_file), "-k", selection],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_base_kernels_match_reference():
    run_without_avx2("test_soft_threshold.py",
                     "cpu and (matches_reference or sparse_and_deterministic or non_contiguous or extreme)")


def test_base_store_lookups_match():
    run_without_avx2("test_store.py", "bit_exact or lossy or half_value or near_the_end or empty_rows or "
                                      "random_damage or concurrent")


def test_base_bag_kernels_match_reference():
    run_without_avx2("test_bag.py", "matches_reference or heavy_duplicates or input_forms or fast_adam_equals_faithful")
