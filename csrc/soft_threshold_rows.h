// Row loops of the CPU soft-threshold kernels, on raw pointers and free of ATen, so that they
// can be compiled once per instruction set (soft_threshold_rows_*.cpp) and picked at run time.
#pragma once

#include <cstdint>

#include "optim_rows.h"

namespace pep_kernels {

enum class RowSource { Shared, PerRow, PerField };

// Threshold layout of the table: where a lookup's threshold row comes from, one column or d.
struct Layout {
  RowSource rows;
  bool per_dim;
};

template <typename T, typename I>
struct ForwardArgs {
  const I* ids;
  const T* w;
  int64_t sw0, sw1;
  const T* s;  // the threshold as (rows, 1 or d)
  int64_t ss0, ss1, num_fields;
  T* out;  // (n, d), contiguous
  int64_t d;
  Layout layout;
  T gk;
};

// Lookups grouped by row: segment u covers order[seg_start[u] .. seg_start[u + 1]) of row seg_rows[u].
template <typename T>
struct BackwardArgs {
  const int64_t* seg_rows;
  const int64_t* seg_start;
  const int64_t* order;
  const T* w;
  int64_t sw0, sw1;
  const T* s;
  int64_t ss0, ss1, num_fields;
  const T* grad;  // (n, d), contiguous
  int64_t d;
  Layout layout;
  T gk;
  bool sparse;   // write segment u's gradients at row u instead of at row seg_rows[u]
  T* grad_w;     // (rows or segments, d); every segment's row is written, others left as they are
  T* grad_s;     // per-row modes: (rows or segments, 1 or d), likewise
  T* contrib;    // shared modes: (n, d) per-lookup terms G * sign(W) * [|W| > t]
  // Fused optimizer: when set, each segment's row of W (and per-row threshold) is updated in
  // place with its gradient, and grad_w / grad_s are not written.
  const OptimArgs<T>* update_w;
  const OptimArgs<T>* update_s;
  // Bags: lookup k's upstream gradient is grad[grad_rows[k]] (its bag's row of (B, d)) times
  // grad_scale[k] (its per-sample weight, or 1 / bag size); null: grad[k], times 1.
  const int64_t* grad_rows = nullptr;
  const T* grad_scale = nullptr;
};

// The whole table: row i's threshold row is 0, i, or its field f (field_offsets[f] <= i < field_offsets[f + 1]).
template <typename T>
struct CountArgs {
  const T* w;
  int64_t sw0, sw1;
  const T* s;
  int64_t ss0, ss1;
  int64_t d;
  Layout layout;
  T gk;
  const int64_t* field_offsets;
};

#define PEP_DECLARE_ROW_KERNELS(ns)                                                              \
  namespace ns {                                                                                 \
  void forward(const ForwardArgs<float, int32_t>& a, int64_t begin, int64_t end);               \
  void forward(const ForwardArgs<float, int64_t>& a, int64_t begin, int64_t end);               \
  void forward(const ForwardArgs<double, int32_t>& a, int64_t begin, int64_t end);              \
  void forward(const ForwardArgs<double, int64_t>& a, int64_t begin, int64_t end);              \
  void backward(const BackwardArgs<float>& a, int64_t begin, int64_t end);                       \
  void backward(const BackwardArgs<double>& a, int64_t begin, int64_t end);                      \
  /* Non-zeros of the soft-thresholded rows [begin, end). */                                     \
  int64_t count_nonzero(const CountArgs<float>& a, int64_t begin, int64_t end);                  \
  int64_t count_nonzero(const CountArgs<double>& a, int64_t begin, int64_t end);                 \
  }

PEP_DECLARE_ROW_KERNELS(rows_base)
PEP_DECLARE_ROW_KERNELS(rows_avx2)

}  // namespace pep_kernels
