"""The CPU kernels without AVX2 (the build for older CPUs) pass the same parity tests."""

import os
import subprocess
import sys
from pathlib import Path


def test_base_kernels_match_reference():
    env = dict(os.environ, PEP_KERNELS_DISABLE_AVX2="1")
    tests = Path(__file__).resolve().parent
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / "test_soft_threshold.py"),
         "-k", "cpu and (matches_reference or sparse_and_deterministic or non_contiguous or extreme)"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
