// Launchers of the SparseRowStore CUDA kernels (store.cu), in plain C++ types so that the
// binding (csrc/store_cuda.cpp) and the kernels share no headers but this one and store_format.h.
#pragma once

#include <cstdint>

#include "../store_format.h"

namespace pep_kernels {
namespace store_cuda {

// The store as the kernels see it: offsets are int64 when wide_offsets, else int32.
struct StoreArgs {
  const void* offsets;
  bool wide_offsets;
  const uint8_t* payload;
  int64_t payload_bytes;
  int64_t num_rows;
  store::Format format;
};

// The lookups' ids: int64 when wide_ids, else int32.
struct IdArgs {
  const void* ids;
  bool wide_ids;
  int64_t count;
};

// out (ids.count, dim) float32: each id's row, zeros where pruned. An id out of range or a row
// that does not parse reads as zeros. Returns the launch's cudaError_t as an int.
int launch_lookup(const StoreArgs& store, const IdArgs& ids, float* out, void* stream);

// out (num_bags, dim) float32: bag b sums the rows of ids [bag_offsets[b], bag_offsets[b + 1]),
// each times per_sample_weights[k] when not null, and `mean` divides by the bag's length. A bag
// whose offsets are out of order or past the ids reads as zeros.
int launch_lookup_bag(const StoreArgs& store, const IdArgs& ids, const int64_t* bag_offsets, int64_t num_bags,
                      const float* per_sample_weights, bool mean, float* out, void* stream);

}  // namespace store_cuda
}  // namespace pep_kernels
