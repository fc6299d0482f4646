// SparseRowStore lookups on CUDA. Needs only the CUDA headers: the ATen binding is
// csrc/store_cuda.cpp, the format and the row parser are csrc/store_format.h (shared with the
// CPU kernels, so both read exactly the same bytes the same way).
//
// One warp per lookup (or bag). A Columns row is scattered: lane l takes entries l, l + 32, ...
// A Bitmask row is walked 32 columns at a time: lane l tests the bit of column base + l, and the
// warp's ballot gives each set bit its rank among the row's values.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "store_cuda.h"

namespace pep_kernels {
namespace store_cuda {
namespace {

using store::Encoding;
using store::Row;
using store::Values;

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
struct Tag {
  using type = T;
};

// Parses the row of ids[i]; false (read as an empty row) for an id out of range or a row that
// does not parse, so that nothing is read outside the store.
template <typename offset_t, typename index_t>
__device__ bool load_row(const StoreArgs& s, const index_t* ids, int64_t i, Row* row) {
  const int64_t r = static_cast<int64_t>(ids[i]);
  if (r < 0 || r >= s.num_rows) return false;
  return store::parse_row(static_cast<const offset_t*>(s.offsets), r, s.payload, s.payload_bytes, s.format, row) ==
         store::RowError::None;
}

// dst[column] = value (kAdd false) or dst[column] += weight * value (kAdd true) for each entry
// of `row`, the warp's lanes sharing the work; a Columns id past dim is skipped.
template <Values V, bool kAdd>
__device__ void write_row(const Row& row, const store::Format& f, float weight, float* dst, int lane) {
  if (f.encoding == Encoding::Columns) {
    for (int64_t k = lane; k < row.count; k += kWarp) {
      const int64_t column = store::column_at(row, k, f.dim);
      if (column >= f.dim) continue;
      const float x = store::load_value<V>(row.values, k, row.scale);
      if constexpr (kAdd) {
        dst[column] += weight * x;
      } else {
        dst[column] = x;
      }
    }
    return;
  }
  int64_t rank = 0;
  for (int64_t base = 0; base < f.dim; base += kWarp) {
    const int64_t column = base + lane;
    const bool kept = column < f.dim && ((row.index[column >> 3] >> (column & 7)) & 1u) != 0;
    const unsigned ballot = __ballot_sync(kFullMask, kept);
    if (kept) {
      const float x = store::load_value<V>(row.values, rank + __popc(ballot & ((1u << lane) - 1u)), row.scale);
      if constexpr (kAdd) {
        dst[column] += weight * x;
      } else {
        dst[column] = x;
      }
    }
    rank += __popc(ballot);
  }
}

__device__ void fill_row(float* dst, int64_t dim, float value, int lane) {
  for (int64_t j = lane; j < dim; j += kWarp) dst[j] = value;
}

template <typename offset_t, typename index_t, Values V>
__global__ void lookup_kernel(StoreArgs s, const index_t* ids, int64_t n, float* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  if (i >= n) return;  // warp-uniform: every lane of a warp has the same i
  float* dst = out + i * s.format.dim;
  fill_row(dst, s.format.dim, 0.0f, lane);
  __syncwarp();
  Row row{};
  if (load_row<offset_t>(s, ids, i, &row) && row.count > 0) write_row<V, false>(row, s.format, 1.0f, dst, lane);
}

template <typename offset_t, typename index_t, Values V>
__global__ void lookup_bag_kernel(StoreArgs s, const index_t* ids, int64_t n, const int64_t* bag_offsets,
                                  int64_t num_bags, const float* per_sample_weights, bool mean, float* out) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  if (b >= num_bags) return;  // warp-uniform
  float* dst = out + b * s.format.dim;
  fill_row(dst, s.format.dim, 0.0f, lane);
  const int64_t begin = bag_offsets[b], end = bag_offsets[b + 1];
  if (begin < 0 || begin > end || end > n) return;  // bad offsets: an empty bag, nothing read past the ids
  for (int64_t k = begin; k < end; ++k) {
    // Orders this id's additions after the previous id's, whichever lanes made them.
    __syncwarp();
    Row row{};
    if (!load_row<offset_t>(s, ids, k, &row) || row.count == 0) continue;
    const float weight = per_sample_weights != nullptr ? per_sample_weights[k] : 1.0f;
    write_row<V, true>(row, s.format, weight, dst, lane);
  }
  __syncwarp();
  if (mean && end > begin) {
    const float inverse = 1.0f / static_cast<float>(end - begin);
    for (int64_t j = lane; j < s.format.dim; j += kWarp) dst[j] *= inverse;
  }
}

// Calls launch(Tag<offset_t>, Tag<index_t>, integral_constant<Values, V>) for the store's types.
template <typename Launch>
int dispatch(const StoreArgs& s, const IdArgs& ids, Launch&& launch) {
  auto with_values = [&](auto offset_tag, auto index_tag) {
    switch (s.format.values) {
      case Values::F32: return launch(offset_tag, index_tag, std::integral_constant<Values, Values::F32>{});
      case Values::F16: return launch(offset_tag, index_tag, std::integral_constant<Values, Values::F16>{});
      case Values::BF16: return launch(offset_tag, index_tag, std::integral_constant<Values, Values::BF16>{});
      case Values::I8: break;
    }
    return launch(offset_tag, index_tag, std::integral_constant<Values, Values::I8>{});
  };
  if (s.wide_offsets) {
    return ids.wide_ids ? with_values(Tag<int64_t>{}, Tag<int64_t>{}) : with_values(Tag<int64_t>{}, Tag<int32_t>{});
  }
  return ids.wide_ids ? with_values(Tag<int32_t>{}, Tag<int64_t>{}) : with_values(Tag<int32_t>{}, Tag<int32_t>{});
}

unsigned blocks_for(int64_t warps) { return static_cast<unsigned>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock); }

}  // namespace

int launch_lookup(const StoreArgs& store, const IdArgs& ids, float* out, void* stream) {
  if (ids.count == 0) return static_cast<int>(cudaSuccess);
  return dispatch(store, ids, [&](auto offset_tag, auto index_tag, auto values) {
    using offset_t = typename decltype(offset_tag)::type;
    using index_t = typename decltype(index_tag)::type;
    lookup_kernel<offset_t, index_t, decltype(values)::value>
        <<<blocks_for(ids.count), kWarp * kWarpsPerBlock, 0, static_cast<cudaStream_t>(stream)>>>(
            store, static_cast<const index_t*>(ids.ids), ids.count, out);
    return static_cast<int>(cudaGetLastError());
  });
}

int launch_lookup_bag(const StoreArgs& store, const IdArgs& ids, const int64_t* bag_offsets, int64_t num_bags,
                      const float* per_sample_weights, bool mean, float* out, void* stream) {
  if (num_bags == 0) return static_cast<int>(cudaSuccess);
  return dispatch(store, ids, [&](auto offset_tag, auto index_tag, auto values) {
    using offset_t = typename decltype(offset_tag)::type;
    using index_t = typename decltype(index_tag)::type;
    lookup_bag_kernel<offset_t, index_t, decltype(values)::value>
        <<<blocks_for(num_bags), kWarp * kWarpsPerBlock, 0, static_cast<cudaStream_t>(stream)>>>(
            store, static_cast<const index_t*>(ids.ids), ids.count, bag_offsets, num_bags, per_sample_weights, mean,
            out);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace store_cuda
}  // namespace pep_kernels
