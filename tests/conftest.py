import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter (exact, slow). The variable must
# be set before the kernels are defined, i.e. before pep_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
# Kernel backends and the device their tests run on.
KERNEL_BACKENDS = ["cpu", "triton"]


def backend_device(backend):
    return "cuda" if backend == "triton" and HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, so results do not depend on test order."""
    torch.manual_seed(0)
