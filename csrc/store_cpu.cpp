#include "store.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <type_traits>

#include "cpu_features.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define PEP_STORE_AVX2 1
#else
#define PEP_STORE_AVX2 0
#endif

namespace pep_kernels {

using store::Encoding;
using store::Format;
using store::Row;
using store::RowError;
using store::Values;

store::Format parse_format(int64_t dim, std::string_view encoding, std::string_view values) {
  TORCH_CHECK_VALUE(dim >= 1 && dim <= store::kMaxDim, "a store's dim must be in 1..", store::kMaxDim, ", got ",
                    dim);
  Format f{Encoding::Columns, Values::F32, dim};
  if (encoding == "bitmask") {
    f.encoding = Encoding::Bitmask;
  } else {
    TORCH_CHECK_VALUE(encoding == "columns", "unknown store encoding '", encoding, "'; expected columns or bitmask");
  }
  if (values == "fp16") {
    f.values = Values::F16;
  } else if (values == "bf16") {
    f.values = Values::BF16;
  } else if (values == "int8") {
    f.values = Values::I8;
  } else {
    TORCH_CHECK_VALUE(values == "fp32", "unknown store values '", values, "'; expected fp32, fp16, bf16 or int8");
  }
  return f;
}

bool parse_bag_mean(std::string_view mode) {
  TORCH_CHECK_VALUE(mode == "sum" || mode == "mean", "unknown bag mode '", mode, "'; expected sum or mean");
  return mode == "mean";
}

namespace {

const char* describe(RowError error) {
  switch (error) {
    case RowError::Range: return "its offsets are out of order or past the end of the payload";
    case RowError::Length: return "its byte count does not fit the format";
    case RowError::Mask: return "its mask has bits set past the table's dim";
    case RowError::Column: return "its column ids are not increasing or not below the table's dim";
    case RowError::Scale: return "its int8 scale is negative or not finite";
    case RowError::None: break;
  }
  return "no error";
}

[[noreturn]] void throw_row_error(int64_t row, RowError error) {
  TORCH_CHECK_VALUE(false, "store row ", row, " is corrupt: ", describe(error));
}

// The store's tensors, checked as tensors (not their contents), made contiguous.
struct StoreTensors {
  at::Tensor offsets, payload;
  int64_t num_rows;
};

StoreTensors store_tensors(const at::Tensor& offsets, const at::Tensor& payload) {
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kInt || offsets.scalar_type() == at::kLong,
                   "store offsets must be int32 or int64, got ", offsets.scalar_type());
  TORCH_CHECK_TYPE(payload.scalar_type() == at::kByte, "a store payload must be uint8, got ", payload.scalar_type());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.numel() >= 2,
                    "store offsets must be 1-D with N + 1 >= 2 entries, got shape ", offsets.sizes());
  TORCH_CHECK_VALUE(payload.dim() == 1, "a store payload must be 1-D, got shape ", payload.sizes());
  TORCH_CHECK_VALUE(offsets.device().is_cpu() && payload.device().is_cpu(), "the CPU store ops need CPU tensors");
  return {offsets.contiguous(), payload.contiguous(), offsets.numel() - 1};
}

at::Tensor checked_ids(const at::Tensor& ids, int64_t num_rows) {
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
                   "ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 1, "ids must be 1-D, got shape ", ids.sizes());
  TORCH_CHECK_VALUE(ids.device().is_cpu(), "the CPU store ops need CPU ids");
  at::Tensor flat = ids.contiguous();
  AT_DISPATCH_INDEX_TYPES(flat.scalar_type(), "store_check_ids", [&] {
    const index_t* id = flat.data_ptr<index_t>();
    for (int64_t k = 0; k < flat.numel(); ++k) {
      TORCH_CHECK_INDEX(id[k] >= 0 && id[k] < num_rows, "index ", static_cast<int64_t>(id[k]),
                        " is out of range for a store of ", num_rows, " rows (valid ids are 0..", num_rows - 1, ")");
    }
  });
  return flat;
}

template <typename F>
void dispatch_offsets(const at::Tensor& offsets, F&& body) {
  if (offsets.scalar_type() == at::kInt) {
    body(offsets.data_ptr<int32_t>());
  } else {
    body(offsets.data_ptr<int64_t>());
  }
}

template <typename F>
void dispatch_values(Values values, F&& body) {
  switch (values) {
    case Values::F32: return body(std::integral_constant<Values, Values::F32>{});
    case Values::F16: return body(std::integral_constant<Values, Values::F16>{});
    case Values::BF16: return body(std::integral_constant<Values, Values::BF16>{});
    case Values::I8: return body(std::integral_constant<Values, Values::I8>{});
  }
}

template <Values V, typename index_t, typename Emit>
void for_each_column_entry(const Row& row, int64_t dim, int64_t row_id, Emit&& emit) {
  for (int64_t k = 0; k < row.count; ++k) {
    index_t column;
    std::memcpy(&column, row.index + k * sizeof(index_t), sizeof column);
    if (column >= dim) throw_row_error(row_id, RowError::Column);
    emit(static_cast<int64_t>(column), store::load_value<V>(row.values, k, row.scale));
  }
}

// Calls emit(column, value) for each stored entry of a parsed row, in column order. A Columns
// row's ids are checked against dim here, before they address anything; parse_row has already
// ruled out mask bits past dim.
template <Values V, typename Emit>
void for_each_entry(const Row& row, const Format& f, int64_t row_id, Emit&& emit) {
  if (row.count == 0) return;  // an empty row has no index to read
  if (row.count == f.dim) {
    // Every column kept (PEP's frequent rows): the values are the row in order, whatever the
    // index says (in a validated store it says 0..d-1); a loop the compiler vectorises.
    for (int64_t k = 0; k < f.dim; ++k) emit(k, store::load_value<V>(row.values, k, row.scale));
    return;
  }
  if (f.encoding == Encoding::Columns) {
    if (store::column_bytes(f.dim) == 1) {
      for_each_column_entry<V, uint8_t>(row, f.dim, row_id, emit);
    } else {
      for_each_column_entry<V, uint16_t>(row, f.dim, row_id, emit);
    }
    return;
  }
  int64_t k = 0;
  for (int64_t b = 0; b < store::mask_bytes(f.dim); ++b) {
    for (uint32_t bits = row.index[b]; bits != 0; bits &= bits - 1) {
      emit(8 * b + store::lowest_bit(bits), store::load_value<V>(row.values, k++, row.scale));
    }
  }
}

// Always inlined: a call per id costs the lookups a third of their time.
template <typename offset_t>
[[gnu::always_inline]] inline Row parsed_row(const offset_t* offsets, int64_t row_id, const uint8_t* payload,
                                             int64_t payload_bytes, const Format& f) {
  Row row{};
  const RowError error = store::parse_row(offsets, row_id, payload, payload_bytes, f, &row);
  if (error != RowError::None) throw_row_error(row_id, error);
  return row;
}

// A lookup's time goes to two dependent cache misses per id (perf: offsets[id], then the row's
// bytes). The loops prefetch the offsets kOffsetsAhead ids ahead and, once those have arrived,
// the first and last bytes of the row kRowsAhead ids ahead, so that the misses of many ids
// overlap. Always inlined: GCC deems a separate function whose only effect is a prefetch free of
// side effects and drops its calls (it did here, and the lookups ran without prefetching).
constexpr int64_t kOffsetsAhead = 32;
constexpr int64_t kRowsAhead = 16;

template <typename index_t, typename offset_t>
[[gnu::always_inline]] inline void prefetch_rows(const index_t* id, int64_t i, int64_t end, const offset_t* offsets,
                                                 const uint8_t* payload, int64_t payload_bytes) {
  if (i + kOffsetsAhead < end) __builtin_prefetch(offsets + id[i + kOffsetsAhead]);
  if (i + kRowsAhead < end && payload_bytes > 0) {
    // The ids are checked; the offsets may not be yet (parse_row checks them): clamp, so that a
    // corrupt offset never forms a pointer outside the payload.
    const index_t row = id[i + kRowsAhead];
    const int64_t begin = static_cast<int64_t>(offsets[row]), end_byte = static_cast<int64_t>(offsets[row + 1]);
    __builtin_prefetch(payload + std::clamp<int64_t>(begin, 0, payload_bytes - 1));
    __builtin_prefetch(payload + std::clamp<int64_t>(end_byte - 1, 0, payload_bytes - 1));
  }
}

// The lookup's loop over ids [begin, end): rows decoded into out (n, dim), zeros where pruned.
template <Values V, typename index_t, typename offset_t>
void lookup_rows(const index_t* id, int64_t begin, int64_t end, const offset_t* offsets, const uint8_t* payload,
                 int64_t payload_bytes, const Format& f, float* out) {
  for (int64_t i = begin; i < end; ++i) {
    prefetch_rows(id, i, end, offsets, payload, payload_bytes);
    const int64_t r = id[i];
    const Row row = parsed_row(offsets, r, payload, payload_bytes, f);
    float* dst = out + i * f.dim;
    if (row.count != f.dim) std::fill(dst, dst + f.dim, 0.0f);  // a full row writes every column
    for_each_entry<V>(row, f, r, [dst](int64_t column, float x) { dst[column] = x; });
  }
}

#if PEP_STORE_AVX2
// The same loop with AVX2 + F16C row writers, for CPUs that have them: a full row is copied (and
// converted) 8 values at a time, a bitmask row expanded 8 columns at a time (the values of a mask
// byte permuted into place), fp16 values converted by the CPU's instruction. Every value is
// the same float as the base kernels' (the conversions are exact, nothing else is computed).
// Compiled for AVX2 function by function (this file's other code and ATen's stay portable); the
// loop is repeated here because a loop compiled without AVX2 cannot inline these writers.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#endif
namespace avx2 {

// The 8 values at p as floats.
template <Values V>
inline __m256 load8(const uint8_t* p, float scale) {
  if constexpr (V == Values::F32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  } else if constexpr (V == Values::F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else if constexpr (V == Values::BF16) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  } else {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), _mm256_set1_ps(scale));
  }
}

template <Values V>
inline float load_value(const uint8_t* values, int64_t k, float scale) {
  if constexpr (V == Values::F16) {
    return _cvtsh_ss(static_cast<unsigned short>(store::load_u16(values + 2 * k)));
  } else {
    return store::load_value<V>(values, k, scale);
  }
}

// For each mask byte m: lane j of the 8 columns takes value popcount(m & ((1 << j) - 1)) of the
// byte's values (its rank among the kept columns).
struct ExpandIndices {
  std::array<uint64_t, 256> lanes{};  // byte j: the rank of column j
  constexpr ExpandIndices() {
    for (uint32_t m = 0; m < 256; ++m) {
      uint64_t ranks = 0;
      uint32_t rank = 0;
      for (uint32_t j = 0; j < 8; ++j) {
        if ((m >> j) & 1u) ranks |= static_cast<uint64_t>(rank++) << (8 * j);
      }
      lanes[m] = ranks;
    }
  }
};
constexpr ExpandIndices kExpand{};

template <Values V>
inline void write_row(const Row& row, const Format& f, int64_t row_id, const uint8_t* payload_end, float* dst) {
  const int64_t vb = store::value_bytes(V);
  const int64_t dim = f.dim, whole = dim / 8 * 8;  // columns in whole groups of 8
  if (row.count == dim) {
    // Every column kept: the values are the row in order (see for_each_entry).
    int64_t j = 0;
    for (; j < whole; j += 8) _mm256_storeu_ps(dst + j, load8<V>(row.values + j * vb, row.scale));
    for (; j < dim; ++j) dst[j] = load_value<V>(row.values, j, row.scale);
    return;
  }
  if (f.encoding == Encoding::Bitmask && row.count > 0) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    int64_t k = 0;  // values read so far
    for (int64_t j = 0; j < whole; j += 8) {
      const uint32_t mask = row.index[j / 8];
      const uint8_t* values = row.values + k * vb;
      if (payload_end - values >= 8 * vb) {  // 8 values, maybe some past the row, never past the payload
        const __m256i ranks = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(kExpand.lanes[mask])));
        const __m256i kept = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(mask)), bit), bit);
        const __m256 x = _mm256_permutevar8x32_ps(load8<V>(values, row.scale), ranks);
        _mm256_storeu_ps(dst + j, _mm256_and_ps(x, _mm256_castsi256_ps(kept)));
      } else {
        for (int64_t c = 0; c < 8; ++c) dst[j + c] = 0.0f;
        int64_t rank = 0;
        for (uint32_t bits = mask; bits != 0; bits &= bits - 1) {
          dst[j + store::lowest_bit(bits)] = load_value<V>(values, rank++, row.scale);
        }
      }
      k += store::popcount8(mask);
    }
    for (int64_t c = whole; c < dim; ++c) dst[c] = 0.0f;
    if (whole < dim) {
      for (uint32_t bits = row.index[whole / 8]; bits != 0; bits &= bits - 1) {
        dst[whole + store::lowest_bit(bits)] = load_value<V>(row.values, k++, row.scale);
      }
    }
    return;
  }
  int64_t j = 0;
  for (; j < whole; j += 8) _mm256_storeu_ps(dst + j, _mm256_setzero_ps());
  for (; j < dim; ++j) dst[j] = 0.0f;
  for (int64_t k = 0; k < row.count; ++k) {  // a Columns row (count 0: an empty row)
    const int64_t column = store::column_at(row, k, dim);
    if (column >= dim) throw_row_error(row_id, RowError::Column);
    dst[column] = load_value<V>(row.values, k, row.scale);
  }
}

template <Values V, typename index_t, typename offset_t>
void lookup_rows(const index_t* id, int64_t begin, int64_t end, const offset_t* offsets, const uint8_t* payload,
                 int64_t payload_bytes, const Format& f, float* out) {
  for (int64_t i = begin; i < end; ++i) {
    prefetch_rows(id, i, end, offsets, payload, payload_bytes);
    const int64_t r = id[i];
    write_row<V>(parsed_row(offsets, r, payload, payload_bytes, f), f, r, payload + payload_bytes, out + i * f.dim);
  }
}

}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // PEP_STORE_AVX2

// Whether the lookups may run their AVX2 + F16C loop (PEP_KERNELS_DISABLE_AVX2=1: never).
bool lookup_with_avx2() {
#if PEP_STORE_AVX2
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

// About 32K output elements per task, so that small batches stay on one thread.
int64_t grain(int64_t elements_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(elements_per_item, 1));
}

void store_le(uint8_t* p, uint32_t value, int bytes) {
  for (int b = 0; b < bytes; ++b) p[b] = static_cast<uint8_t>(value >> (8 * b));
}

// Writes the kept entries of one dense row (those != 0) in the store's row format.
template <Values V>
void encode_row(const float* w, const Format& f, int64_t row_id, uint8_t* p) {
  double max_abs = 0.0;
  if constexpr (V == Values::I8) {
    for (int64_t j = 0; j < f.dim; ++j) {
      TORCH_CHECK_VALUE(std::isfinite(w[j]), "row ", row_id, " holds ", w[j], ": int8 values need a finite table");
      max_abs = std::max(max_abs, std::abs(static_cast<double>(w[j])));
    }
    store_le(p, store::float_to_bits(static_cast<float>(max_abs / 127.0)), 4);
    p += 4;
  }
  int64_t count = 0;
  if (f.encoding == Encoding::Bitmask) {
    std::fill(p, p + store::mask_bytes(f.dim), uint8_t{0});
    for (int64_t j = 0; j < f.dim; ++j) {
      if (w[j] != 0) {
        p[j / 8] = static_cast<uint8_t>(p[j / 8] | (1u << (j % 8)));
        ++count;
      }
    }
    p += store::mask_bytes(f.dim);
  } else {
    const int width = static_cast<int>(store::column_bytes(f.dim));
    for (int64_t j = 0; j < f.dim; ++j) {
      if (w[j] != 0) store_le(p + width * count++, static_cast<uint32_t>(j), width);
    }
    p += width * count;
  }
  for (int64_t j = 0; j < f.dim; ++j) {
    if (w[j] == 0) continue;
    if constexpr (V == Values::F32) {
      store_le(p, store::float_to_bits(w[j]), 4);
    } else if constexpr (V == Values::F16) {
      store_le(p, c10::Half(w[j]).x, 2);
    } else if constexpr (V == Values::BF16) {
      store_le(p, c10::BFloat16(w[j]).x, 2);
    } else {
      const double q = std::nearbyint(static_cast<double>(w[j]) / max_abs * 127.0);
      *p = static_cast<uint8_t>(static_cast<int8_t>(std::clamp(q, -127.0, 127.0)));
    }
    p += store::value_bytes(V);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> store_encode(const at::Tensor& weight_in, std::string_view encoding,
                                                std::string_view values, bool wide_offsets) {
  TORCH_CHECK_TYPE(weight_in.scalar_type() == at::kFloat, "a store is built from a float32 table, got ",
                   weight_in.scalar_type());
  TORCH_CHECK_VALUE(weight_in.dim() == 2 && weight_in.size(0) >= 1, "the table must be 2-D with at least one row, got ",
                    weight_in.sizes());
  TORCH_CHECK_VALUE(weight_in.device().is_cpu(), "store_encode needs a CPU table");
  const Format f = parse_format(weight_in.size(1), encoding, values);
  const at::Tensor weight = weight_in.contiguous();
  const float* w = weight.data_ptr<float>();
  const int64_t num_rows = weight.size(0), dim = f.dim;

  at::Tensor lengths = at::empty({num_rows + 1}, weight.options().dtype(at::kLong));
  int64_t* length = lengths.data_ptr<int64_t>();
  length[0] = 0;
  at::parallel_for(0, num_rows, grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = w + r * dim;
      length[r + 1] = store::row_bytes(f, std::count_if(row, row + dim, [](float x) { return x != 0; }));
    }
  });
  const at::Tensor offsets = at::cumsum(lengths, 0);
  const int64_t* offset = offsets.data_ptr<int64_t>();
  const int64_t total = offset[num_rows];
  TORCH_CHECK_VALUE(wide_offsets || total <= std::numeric_limits<int32_t>::max(), "the store needs ", total,
                    " payload bytes: too many for int32 offsets");
  at::Tensor payload = at::empty({total}, weight.options().dtype(at::kByte));
  uint8_t* p = payload.data_ptr<uint8_t>();
  dispatch_values(f.values, [&](auto v) {
    constexpr Values V = decltype(v)::value;
    at::parallel_for(0, num_rows, grain(dim), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (offset[r + 1] > offset[r]) encode_row<V>(w + r * dim, f, r, p + offset[r]);
      }
    });
  });
  return {wide_offsets ? offsets : offsets.to(at::kInt), payload};
}

at::Tensor store_row_dims(const at::Tensor& offsets_in, const at::Tensor& payload_in, int64_t dim,
                          std::string_view encoding, std::string_view values) {
  const Format f = parse_format(dim, encoding, values);
  const StoreTensors s = store_tensors(offsets_in, payload_in);
  const uint8_t* payload = s.payload.data_ptr<uint8_t>();
  const int64_t payload_bytes = s.payload.numel();
  at::Tensor dims = at::empty({s.num_rows}, s.offsets.options().dtype(at::kLong));
  int64_t* count = dims.data_ptr<int64_t>();
  dispatch_offsets(s.offsets, [&](const auto* offsets) {
    // Rows tile the payload: they start at byte 0 and end at its last byte.
    TORCH_CHECK_VALUE(offsets[0] == 0 && offsets[s.num_rows] == payload_bytes, "store offsets run from ",
                      static_cast<int64_t>(offsets[0]), " to ", static_cast<int64_t>(offsets[s.num_rows]),
                      "; they must run from 0 to the payload size ", payload_bytes);
    at::parallel_for(0, s.num_rows, grain(4 * f.dim), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const Row row = parsed_row(offsets, r, payload, payload_bytes, f);
        if (f.values == Values::I8 && row.count > 0 && !(std::isfinite(row.scale) && row.scale >= 0)) {
          throw_row_error(r, RowError::Scale);
        }
        if (f.encoding == Encoding::Columns) {
          int64_t previous = -1;
          for (int64_t k = 0; k < row.count; ++k) {
            const int64_t column = store::column_at(row, k, f.dim);
            if (column <= previous || column >= f.dim) throw_row_error(r, RowError::Column);
            previous = column;
          }
        }
        count[r] = row.count;
      }
    });
  });
  return dims;
}

at::Tensor store_lookup(const at::Tensor& offsets_in, const at::Tensor& payload_in, const at::Tensor& ids_in,
                        int64_t dim, std::string_view encoding, std::string_view values) {
  const Format f = parse_format(dim, encoding, values);
  const StoreTensors s = store_tensors(offsets_in, payload_in);
  const at::Tensor ids = checked_ids(ids_in, s.num_rows);
  const int64_t n = ids.numel();
  at::Tensor out = at::empty({n, dim}, s.payload.options().dtype(at::kFloat));
  if (n == 0) return out;
  const uint8_t* payload = s.payload.data_ptr<uint8_t>();
  const int64_t payload_bytes = s.payload.numel();
  float* o = out.data_ptr<float>();
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "store_lookup", [&] {
    const index_t* id = ids.data_ptr<index_t>();
    dispatch_offsets(s.offsets, [&](const auto* offsets) {
      dispatch_values(f.values, [&](auto v) {
        constexpr Values V = decltype(v)::value;
        [[maybe_unused]] const bool avx2 = lookup_with_avx2();
        at::parallel_for(0, n, grain(dim), [&](int64_t begin, int64_t end) {
#if PEP_STORE_AVX2
          if (avx2) return avx2::lookup_rows<V>(id, begin, end, offsets, payload, payload_bytes, f, o);
#endif
          lookup_rows<V>(id, begin, end, offsets, payload, payload_bytes, f, o);
        });
      });
    });
  });
  return out;
}

at::Tensor store_lookup_bag(const at::Tensor& offsets_in, const at::Tensor& payload_in, const at::Tensor& ids_in,
                            const at::Tensor& bag_offsets_in, const std::optional<at::Tensor>& per_sample_weights,
                            int64_t dim, std::string_view encoding, std::string_view values, std::string_view mode) {
  const Format f = parse_format(dim, encoding, values);
  const bool mean = parse_bag_mean(mode);
  const StoreTensors s = store_tensors(offsets_in, payload_in);
  const at::Tensor ids = checked_ids(ids_in, s.num_rows);
  const int64_t n = ids.numel();
  TORCH_CHECK_TYPE(bag_offsets_in.scalar_type() == at::kLong, "bag offsets must be int64, got ",
                   bag_offsets_in.scalar_type());
  TORCH_CHECK_VALUE(bag_offsets_in.dim() == 1 && bag_offsets_in.numel() >= 1 && bag_offsets_in.device().is_cpu(),
                    "bag offsets must be a 1-D CPU tensor of B + 1 entries, got shape ", bag_offsets_in.sizes());
  const at::Tensor bag_offsets = bag_offsets_in.contiguous();
  const int64_t* bag = bag_offsets.data_ptr<int64_t>();
  const int64_t num_bags = bag_offsets.numel() - 1;
  TORCH_CHECK_VALUE(bag[0] == 0 && bag[num_bags] == n, "bag offsets must run from 0 to the number of ids ", n,
                    ", got ", bag[0], " to ", bag[num_bags]);
  for (int64_t b = 0; b < num_bags; ++b) {
    TORCH_CHECK_VALUE(bag[b] <= bag[b + 1], "bag offsets must be non-decreasing and at most the number of ids ", n,
                      ", got ", bag[b], " then ", bag[b + 1]);
  }
  at::Tensor weights;
  if (per_sample_weights.has_value()) {
    TORCH_CHECK_VALUE(!mean, "per_sample_weights need mode 'sum'");
    TORCH_CHECK_TYPE(per_sample_weights->scalar_type() == at::kFloat, "per_sample_weights must be float32, got ",
                     per_sample_weights->scalar_type());
    TORCH_CHECK_VALUE(per_sample_weights->dim() == 1 && per_sample_weights->numel() == n &&
                          per_sample_weights->device().is_cpu(),
                      "per_sample_weights must be a 1-D CPU tensor of one weight per id (", n, "), got shape ",
                      per_sample_weights->sizes());
    weights = per_sample_weights->contiguous();
  }
  at::Tensor out = at::zeros({num_bags, dim}, s.payload.options().dtype(at::kFloat));
  if (num_bags == 0 || n == 0) return out;
  const uint8_t* payload = s.payload.data_ptr<uint8_t>();
  const int64_t payload_bytes = s.payload.numel();
  const float* weight = weights.defined() ? weights.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "store_lookup_bag", [&] {
    const index_t* id = ids.data_ptr<index_t>();
    dispatch_offsets(s.offsets, [&](const auto* offsets) {
      dispatch_values(f.values, [&](auto v) {
        constexpr Values V = decltype(v)::value;
        at::parallel_for(0, num_bags, grain(dim * std::max<int64_t>(1, n / num_bags)), [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b) {
            float* dst = o + b * dim;
            for (int64_t k = bag[b]; k < bag[b + 1]; ++k) {
              prefetch_rows(id, k, n, offsets, payload, payload_bytes);
              const int64_t r = id[k];
              const Row row = parsed_row(offsets, r, payload, payload_bytes, f);
              if (weight == nullptr) {
                for_each_entry<V>(row, f, r, [dst](int64_t column, float x) { dst[column] += x; });
              } else {
                const float scale = weight[k];
                for_each_entry<V>(row, f, r, [dst, scale](int64_t column, float x) { dst[column] += scale * x; });
              }
            }
            const int64_t length = bag[b + 1] - bag[b];
            if (mean && length > 0) {
              // As torch's CPU embedding_bag: the sum times 1 / length.
              const float inverse = 1.0f / static_cast<float>(length);
              for (int64_t j = 0; j < dim; ++j) dst[j] *= inverse;
            }
          }
        });
      });
    });
  });
  return out;
}

}  // namespace pep_kernels
