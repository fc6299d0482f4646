// Row loops of the CPU soft-threshold EmbeddingBag kernels (the pooled forward and the gradient of
// per-sample weights; the bag backward is the lookup backward's, soft_threshold_rows.h), on raw
// pointers, compiled once per instruction set (soft_threshold_rows_*.cpp) and picked at run time.
#pragma once

#include <cstdint>

#include "soft_threshold_rows.h"

namespace pep_kernels {

// Bag b pools lookups bag_offsets[b] .. bag_offsets[b + 1] - 1; a lookup of row padding_idx
// (-1: none) is left out, also of a mean's count. Thresholds are shared or per row (no fields).
template <typename T, typename I>
struct BagArgs {
  const I* ids;
  const int64_t* bag_offsets;  // (B + 1,)
  const T* per_sample_weights;  // (n,), or null
  const T* w;
  int64_t sw0, sw1;
  const T* s;  // the threshold as (rows, 1 or d)
  int64_t ss0, ss1;
  int64_t d;
  Layout layout;
  T gk;
  bool mean;
  int64_t padding_idx;
};

// out[b] = sum over bag b's lookups k of scale_k * S(W[ids[k]], t), scale_k its per-sample weight
// or 1; a mean divided by the bag's count. (B, d), contiguous; an empty bag is zeros.
template <typename T, typename I>
struct BagForwardArgs {
  BagArgs<T, I> bag;
  T* out;
};

// grad_weights[k] = <grad[bags[k]], S(W[ids[k]], t)>, 0 for a padding lookup: the gradient of
// lookup k's per-sample weight, from the upstream gradient grad (B, d) of the bags.
template <typename T, typename I>
struct BagWeightGradArgs {
  BagArgs<T, I> bag;
  const T* grad;
  const int64_t* bags;  // (n,): the bag of each lookup
  T* grad_weights;
};

#define PEP_DECLARE_BAG_KERNELS(ns)                                                                      \
  namespace ns {                                                                                         \
  /* Bags [begin, end). */                                                                               \
  void bag_forward(const BagForwardArgs<float, int32_t>& a, int64_t begin, int64_t end);                \
  void bag_forward(const BagForwardArgs<float, int64_t>& a, int64_t begin, int64_t end);                \
  void bag_forward(const BagForwardArgs<double, int32_t>& a, int64_t begin, int64_t end);               \
  void bag_forward(const BagForwardArgs<double, int64_t>& a, int64_t begin, int64_t end);               \
  /* Lookups [begin, end). */                                                                            \
  void bag_weight_grad(const BagWeightGradArgs<float, int32_t>& a, int64_t begin, int64_t end);         \
  void bag_weight_grad(const BagWeightGradArgs<float, int64_t>& a, int64_t begin, int64_t end);         \
  void bag_weight_grad(const BagWeightGradArgs<double, int32_t>& a, int64_t begin, int64_t end);        \
  void bag_weight_grad(const BagWeightGradArgs<double, int64_t>& a, int64_t begin, int64_t end);        \
  }

PEP_DECLARE_BAG_KERNELS(rows_base)
PEP_DECLARE_BAG_KERNELS(rows_avx2)

}  // namespace pep_kernels
