import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter (exact, slow). The variable must
# be set before the kernels are defined, i.e. before pep_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, so results do not depend on test order."""
    torch.manual_seed(0)


# Hypothesis example budgets (tests/test_properties.py, tests/test_fuzz_files.py), picked by
# HYPOTHESIS_PROFILE: "ci" (default, each of those files < 60 s on 2 cores) or "long" (about 30x).
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test extra; only the property and fuzz tests need it
    pass
else:
    _slow = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
    settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=_slow, print_blob=True)
    settings.register_profile("long", max_examples=1200, deadline=None, suppress_health_check=_slow, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
