"""Fake kernels of the SparseRowStore C++ ops (csrc/store_cpu.cpp, schemas in csrc/ops.cpp), so
that torch.compile and torch.export trace through store lookups."""

import torch

from .soft_threshold import HAS_CPU_KERNELS

if HAS_CPU_KERNELS:

    @torch.library.register_fake("pep_kernels::store_encode")
    def _(weight, encoding, values, wide_offsets):
        offsets = weight.new_empty(weight.shape[0] + 1, dtype=torch.int64 if wide_offsets else torch.int32)
        payload_bytes = torch.library.get_ctx().new_dynamic_size()
        return offsets, weight.new_empty(payload_bytes, dtype=torch.uint8)

    @torch.library.register_fake("pep_kernels::store_row_dims")
    def _(offsets, payload, dim, encoding, values):
        return offsets.new_empty(offsets.shape[0] - 1, dtype=torch.int64)

    @torch.library.register_fake("pep_kernels::store_lookup")
    def _(offsets, payload, ids, dim, encoding, values):
        return payload.new_empty((ids.shape[0], dim), dtype=torch.float32)

    @torch.library.register_fake("pep_kernels::store_lookup_bag")
    def _(offsets, payload, ids, bag_offsets, per_sample_weights, dim, encoding, values, mode):
        return payload.new_empty((bag_offsets.shape[0] - 1, dim), dtype=torch.float32)
