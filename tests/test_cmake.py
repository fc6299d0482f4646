"""CMakeLists.txt builds the same sources as setup.py for C++ consumers, and its C++ test passes."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_and_ctest(tmp_path):
    build = tmp_path / "build"
    run = lambda *cmd: subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)  # noqa: E731
    steps = [
        ("cmake", "-S", ".", "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"),
        ("cmake", "--build", str(build), "-j2"),
        ("ctest", "--test-dir", str(build), "--output-on-failure"),
    ]
    for cmd in steps:
        result = run(*cmd)
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "100% tests passed" in result.stdout
