"""Builds pep_kernels._C, the C++ (and, with a CUDA toolchain, CUDA) kernels.

CUDA sources are compiled when torch was built with CUDA and nvcc is found, or when
PEP_KERNELS_CUDA=1/0 says so; no GPU is needed or probed at build time. Install with
`pip install --no-build-isolation -e .` so the build uses the torch already installed.
"""

import os
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent
SOURCES = [
    line.strip()
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]
# No code here reads errno or FP exception flags, and without them the row loops vectorise.
# No FMA contraction: every loop rounds like torch's element-wise ops, whatever the instruction set,
# so an optimizer element rule gives the same bits wherever it runs (fast Adam == faithful Adam).
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]


def build_cuda():
    override = os.environ.get("PEP_KERNELS_CUDA")
    if override is not None:
        return override == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


with_cuda = build_cuda()
sources = [s for s in SOURCES if with_cuda or not s.endswith(".cu")]
extension = (CUDAExtension if with_cuda else CppExtension)(
    "pep_kernels._C",
    sources,
    extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3"]},
    extra_link_args=["-fopenmp"],
    define_macros=[("PEP_KERNELS_WITH_CUDA", "1")] if with_cuda else [],
)

setup(ext_modules=[extension], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
