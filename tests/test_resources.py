"""Resource safety: many lookups and fused optimizer steps keep the resident memory flat.

10,000 forward/backward calls of a small PEPEmbedding on the C++ backend, with plain autograd
gradients and with the fused `fast` Adam, measuring the resident set (/proc/self/statm) after a
warm-up of 2,000 calls (the allocator settles within about 2,000: measured flat from there to
40,000) and at the end. Tolerance: 3 MiB over the 8,000 measured calls. A leak of 400 bytes a
call (a twentieth of one call's output, 32 x 4 x 16 floats = 8 KiB) would add 3.1 MiB; what grows
by design is fast Adam's table of per-step factors (`Adam.schedule`, 2 x capacity floats, doubled
when the step count reaches it: 16 bytes a step, about 1.1 MiB of resident memory from step 2,000
to 10,000 with the temporary Python lists that build it, measured). Python objects are
counted too (a kept autograd graph or saved context would show there first).
"""

import gc
import os
import time

import pytest
import torch

from pep_kernels import PEPEmbedding
from pep_kernels.optim import Adam

FIELD_DIMS = [300, 200, 100, 24]
CALLS, WARM_UP = 10_000, 2_000
RSS_TOLERANCE = 3 * 2**20
OBJECT_TOLERANCE = 50


def rss_bytes():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
@pytest.mark.parametrize("optimizer", [None, "adam_fast"])
def test_repeated_forward_backward_keeps_memory_flat(optimizer):
    torch.manual_seed(0)
    rule = Adam(lr=1e-3, weight_decay=1e-5, mode="fast") if optimizer else None
    emb = PEPEmbedding(sum(FIELD_DIMS), 16, field_dims=FIELD_DIMS, threshold_init=-4.0, backend="cpu", optimizer=rule)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.stack([torch.randint(0, f, (32,), generator=gen) for f in FIELD_DIMS], 1) for _ in range(16)]
    start = time.perf_counter()
    for call in range(CALLS):
        if call == WARM_UP:
            gc.collect()
            objects_warm = len(gc.get_objects())  # first: the list of objects is itself megabytes
            rss_warm = rss_bytes()
        emb.zero_grad(set_to_none=True)
        emb(batches[call % len(batches)]).square().sum().backward()
    gc.collect()
    grown = rss_bytes() - rss_warm
    objects = len(gc.get_objects()) - objects_warm
    print(f"\n{optimizer}: {CALLS} calls in {time.perf_counter() - start:.1f} s, resident memory "
          f"{grown / 2**20:+.2f} MiB and {objects:+d} Python objects after the warm-up")
    assert torch.isfinite(emb.weight).all()
    assert grown < RSS_TOLERANCE, f"resident memory grew by {grown / 2**20:.1f} MiB over {CALLS - WARM_UP} calls"
    assert objects < OBJECT_TOLERANCE, f"{objects} more Python objects after {CALLS - WARM_UP} calls"
