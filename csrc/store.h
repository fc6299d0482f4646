// SparseRowStore: a pruned embedding table in per-row compressed form, for serving. The byte
// format is in store_format.h; the Python face is pep_kernels/store.py.
//
// Every op takes the store as (offsets, payload, dim, encoding, values): offsets int32/int64
// (N + 1), payload uint8, encoding "columns" or "bitmask", values "fp32", "fp16", "bf16" or
// "int8". Lookups re-check each row they read (byte range, length, column ids), so no store
// content, however damaged, makes them read or write out of bounds; `store_row_dims` checks the
// whole store once (what loading a file runs).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "store_format.h"

namespace pep_kernels {

// The format named by an op's arguments; ValueError for an unknown name or a dim outside
// 1..store::kMaxDim.
store::Format parse_format(int64_t dim, std::string_view encoding, std::string_view values);

// Whether a bag mode is "mean" (true) or "sum" (false); ValueError for anything else.
bool parse_bag_mean(std::string_view mode);

// (offsets, payload) of a pruned dense float32 table (N, d): the non-zero entries of each row.
// wide_offsets: int64 offsets, else int32 (ValueError when the payload outgrows them).
std::tuple<at::Tensor, at::Tensor> store_encode(const at::Tensor& weight, std::string_view encoding,
                                                std::string_view values, bool wide_offsets);

// Validates every row (ValueError naming the first bad row found) and returns the number of
// stored entries of each row, int64 (N,).
at::Tensor store_row_dims(const at::Tensor& offsets, const at::Tensor& payload, int64_t dim,
                          std::string_view encoding, std::string_view values);

// Rows `ids` (1-D int32/int64) decoded to float32 (n, dim), zeros where pruned. IndexError for
// an id outside [0, N).
at::Tensor store_lookup(const at::Tensor& offsets, const at::Tensor& payload, const at::Tensor& ids, int64_t dim,
                        std::string_view encoding, std::string_view values);

// Bags of rows reduced by "sum" or "mean", float32 (B, dim): bag b is ids[bag_offsets[b],
// bag_offsets[b + 1]) (B + 1 offsets, first 0, last ids.numel()), each row scaled by its
// per_sample_weights entry when given (sum only). An empty bag is zeros.
at::Tensor store_lookup_bag(const at::Tensor& offsets, const at::Tensor& payload, const at::Tensor& ids,
                            const at::Tensor& bag_offsets, const std::optional<at::Tensor>& per_sample_weights,
                            int64_t dim, std::string_view encoding, std::string_view values, std::string_view mode);

#if defined(PEP_KERNELS_WITH_CUDA)
// The same lookups on CUDA tensors (csrc/store_cuda.cpp, kernels in csrc/cuda/store.cu). Ids
// are checked by the caller (pep_kernels.store); a bad row reads as zeros, never out of bounds.
at::Tensor store_lookup_cuda(const at::Tensor& offsets, const at::Tensor& payload, const at::Tensor& ids,
                             int64_t dim, std::string_view encoding, std::string_view values);
at::Tensor store_lookup_bag_cuda(const at::Tensor& offsets, const at::Tensor& payload, const at::Tensor& ids,
                                 const at::Tensor& bag_offsets, const std::optional<at::Tensor>& per_sample_weights,
                                 int64_t dim, std::string_view encoding, std::string_view values,
                                 std::string_view mode);
#endif

}  // namespace pep_kernels
