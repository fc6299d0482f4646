// The byte format of a SparseRowStore and the row parser every kernel uses, CPU and CUDA alike.
// Plain C++ (no ATen): csrc/cuda/store.cu includes it with nvcc.
//
// A store of N rows and dim d is `offsets` (N + 1 int32 or int64) and a byte `payload`. Row i is
// payload[offsets[i], offsets[i + 1]); an empty row (every entry pruned) has no bytes. A kept row
// holds, in this order:
//   int8 values only: its fp32 scale (4 bytes; value = int8 * scale);
//   encoding Columns: its k column ids, increasing (1 byte each when d <= 256, else 2), then its k values;
//   encoding Bitmask: ceil(d / 8) mask bytes (bit j of byte b set: column 8b + j is kept), then
//                     the values of the set bits in column order;
// values being fp32, fp16, bf16 (4 or 2 bytes) or int8. Multi-byte fields are little-endian and
// unaligned: they are read with memcpy, a plain load on x86 and byte loads on a GPU.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the store format is little-endian and this reader loads it as is: it needs a little-endian machine"
#endif

#if defined(__CUDACC__)
#define PEP_HOST_DEVICE __host__ __device__
#else
#define PEP_HOST_DEVICE
#endif

namespace pep_kernels {
namespace store {

enum class Encoding : int32_t { Columns = 0, Bitmask = 1 };
enum class Values : int32_t { F32 = 0, F16 = 1, BF16 = 2, I8 = 3 };

// The largest dim: 2-byte column ids reach it, and it bounds what a lookup allocates per id.
constexpr int64_t kMaxDim = 65536;

struct Format {
  Encoding encoding;
  Values values;
  int64_t dim;
};

PEP_HOST_DEVICE inline int64_t value_bytes(Values v) {
  return v == Values::F32 ? 4 : (v == Values::I8 ? 1 : 2);
}
PEP_HOST_DEVICE inline int64_t scale_bytes(Values v) { return v == Values::I8 ? 4 : 0; }
PEP_HOST_DEVICE inline int64_t column_bytes(int64_t dim) { return dim <= 256 ? 1 : 2; }
PEP_HOST_DEVICE inline int64_t mask_bytes(int64_t dim) { return (dim + 7) / 8; }

// Bytes of a kept row of `count` values.
PEP_HOST_DEVICE inline int64_t row_bytes(const Format& f, int64_t count) {
  if (count == 0) return 0;
  const int64_t index = f.encoding == Encoding::Columns ? count * column_bytes(f.dim) : mask_bytes(f.dim);
  return scale_bytes(f.values) + index + count * value_bytes(f.values);
}

PEP_HOST_DEVICE inline int popcount8(uint32_t byte) {
#if defined(__CUDA_ARCH__)
  return __popc(byte);
#else
  return __builtin_popcount(byte);
#endif
}

PEP_HOST_DEVICE inline int lowest_bit(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __ffs(static_cast<int>(x)) - 1;
#else
  return __builtin_ctz(x);
#endif
}

PEP_HOST_DEVICE inline uint32_t load_u16(const uint8_t* p) {
  uint16_t value;
  memcpy(&value, p, sizeof value);
  return value;
}

PEP_HOST_DEVICE inline float bits_to_float(uint32_t bits) {
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

PEP_HOST_DEVICE inline float load_f32(const uint8_t* p) {
  float value;
  memcpy(&value, p, sizeof value);
  return value;
}

PEP_HOST_DEVICE inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  return bits;
}

// IEEE binary16 -> binary32, exact and branch-free (the fp16 library's method, as c10::Half):
// normal halves are rebased by one exact multiply by 2^-112, subnormal ones rebuilt by one exact
// subtraction from a magic number.
PEP_HOST_DEVICE inline float half_to_float(uint32_t h) {
  const uint32_t w = h << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (0xe0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  return bits_to_float(sign | float_to_bits(two_w < (1u << 27) ? denormalized : normalized));
}

// Value k of a row whose values start at `p` (the int8 scale applied).
template <Values V>
PEP_HOST_DEVICE inline float load_value(const uint8_t* p, int64_t k, float scale) {
  if constexpr (V == Values::F32) {
    return load_f32(p + 4 * k);
  } else if constexpr (V == Values::F16) {
    return half_to_float(load_u16(p + 2 * k));
  } else if constexpr (V == Values::BF16) {
    return bits_to_float(load_u16(p + 2 * k) << 16);
  } else {
    return static_cast<float>(static_cast<int8_t>(p[k])) * scale;
  }
}

// A parsed row: `count` values (0: empty row), its column ids or mask at `index`, values at `values`.
struct Row {
  const uint8_t* index;
  const uint8_t* values;
  int64_t count;
  float scale;
};

enum class RowError : int32_t {
  None = 0,
  Range,   // offsets out of order or past the payload
  Length,  // the byte count does not fit the format
  Mask,    // mask bits set past dim
  Column,  // a column id >= dim, or ids not increasing
  Scale,   // an int8 scale that is negative or not finite
};

// length / entry for a Columns entry of 2 to 6 bytes, each a division by a constant: a division
// by a variable took a tenth of a CPU lookup's time.
PEP_HOST_DEVICE inline int64_t divide_by_entry(int64_t length, int64_t entry) {
  switch (entry) {
    case 2: return length / 2;
    case 3: return length / 3;
    case 4: return length / 4;
    case 5: return length / 5;
    case 6: return length / 6;
    default: return length / entry;
  }
}

// Parses row `row`. Checks everything that keeps a reader inside the payload and the output row:
// the row's byte range, its length against its count (columns) or mask popcount (bitmask), and
// mask bits past dim. Column ids are left to the readers, which check each against dim before
// using it; store_row_dims (validation) also checks that they increase.
template <typename offset_t>
PEP_HOST_DEVICE inline RowError parse_row(const offset_t* offsets, int64_t row, const uint8_t* payload,
                                          int64_t payload_bytes, const Format& f, Row* out) {
  const int64_t begin = static_cast<int64_t>(offsets[row]);
  const int64_t end = static_cast<int64_t>(offsets[row + 1]);
  out->count = 0;
  out->scale = 1.0f;
  if (begin < 0 || begin > end || end > payload_bytes) return RowError::Range;
  int64_t length = end - begin;
  if (length == 0) return RowError::None;
  const uint8_t* p = payload + begin;
  const int64_t sb = scale_bytes(f.values), vb = value_bytes(f.values);
  if (length < sb) return RowError::Length;
  if (sb != 0) out->scale = load_f32(p);
  p += sb;
  length -= sb;
  int64_t count = 0;
  if (f.encoding == Encoding::Columns) {
    const int64_t entry = column_bytes(f.dim) + vb;
    count = divide_by_entry(length, entry);
    if (count * entry != length) return RowError::Length;
    out->values = p + count * column_bytes(f.dim);
  } else {
    const int64_t mb = mask_bytes(f.dim);
    if (length < mb) return RowError::Length;
    for (int64_t b = 0; b < mb; ++b) count += popcount8(p[b]);
    const uint32_t past_dim = f.dim % 8 == 0 ? 0u : (0xffu << (f.dim % 8)) & 0xffu;
    if ((p[mb - 1] & past_dim) != 0) return RowError::Mask;
    if (length != mb + count * vb) return RowError::Length;
    out->values = p + mb;
  }
  if (count == 0) return RowError::Length;  // a kept row stores at least one value
  out->index = p;
  out->count = count;
  return RowError::None;
}

// Column id of entry k of a Columns row.
PEP_HOST_DEVICE inline int64_t column_at(const Row& row, int64_t k, int64_t dim) {
  return column_bytes(dim) == 1 ? row.index[k] : load_u16(row.index + 2 * k);
}

}  // namespace store
}  // namespace pep_kernels
