// Row-sparse optimizer updates of a table parameter: the element rules and their raw-pointer row
// loops, compiled per instruction set like the soft-threshold row loops.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>

namespace pep_kernels {

enum class RowOptim { SGD, Adagrad, RowwiseAdagrad, Adam, AdamDense };

// `fast` Adam catches a row up over a gap in closed-form segments of up to kSegmentSteps steps
// (csrc/optim_rows.inc). The coefficients of a segment of L steps that depend on L only.
constexpr int64_t kSegmentSteps = 256;

template <typename T>
struct SegmentPowers {
  T beta1_l, momentum_sum;              // beta1^L, sum_{i=1..L} beta1^i
  int64_t centroid;                    // c: sum_i i beta1^i / sum_i beta1^i, rounded
  T beta2_c, one_minus_beta2_c;        // beta2^c
  T beta2_mid, one_minus_beta2_mid;    // beta2^h at the midpoint h = (L + 1) / 2
  T beta2_l, one_minus_beta2_l;        // beta2^L
};

// One table parameter (rows, cols), contiguous, and its optimizer state. The element rules are
// torch.optim's (coupled L2: the gradient is g + weight_decay * p), in the same operation order.
template <typename T>
struct OptimArgs {
  RowOptim kind;
  T* param;
  int64_t cols;
  T* state1;           // Adagrad: sum of squared gradients, (rows, cols) or row-wise (rows,); Adam: exp_avg
  T* state2;           // Adam: exp_avg_sq
  int64_t* last_step;  // Adam: the step each row is current to, (rows,)
  const T* step_size;  // Adam: lr / (1 - beta1^u) at index u
  const T* bc2_sqrt;   // Adam: sqrt(1 - beta2^u) at index u
  // Adam: sum_{k<=u} step_size * bc2_sqrt at index u, in two parts (hi + lo: double precision
  // in float tables), so that a segment's sum is a difference that keeps its digits.
  const T* rate_sum_hi;
  const T* rate_sum_lo;
  T lr, eps, weight_decay;
  T beta2, one_minus_beta1, one_minus_beta2;  // 1 - beta rounded from double, as torch passes them
  int64_t step;  // the step being applied, from 1
  std::array<SegmentPowers<T>, kSegmentSteps + 1> segment_powers;  // Adam: at index L = 1..kSegmentSteps
};

#define PEP_DECLARE_OPTIM_KERNELS(ns)                                                                   \
  namespace ns {                                                                                        \
  /* Applies step `o.step` to rows[i] with loss gradient grads[i] (rows sorted or not, distinct). */    \
  void apply_rows(const OptimArgs<float>& o, const int64_t* rows, const float* grads, int64_t begin,  \
                  int64_t end);                                                                         \
  void apply_rows(const OptimArgs<double>& o, const int64_t* rows, const double* grads, int64_t begin, \
                  int64_t end);                                                                         \
  /* Adam: catches rows[i] (or row i when rows is null) of `count` parameters up to `to_step` over */ \
  /* the steps each was not in a batch, where a dense step updates it with a zero loss gradient */    \
  /* (`fast` Adam's rule); only the rows that task `part` of `parts` owns. */                         \
  void catch_up(const OptimArgs<float>* params, int64_t count, const int64_t* rows, int64_t begin,    \
                int64_t end, int64_t part, int64_t parts, int64_t to_step);                           \
  void catch_up(const OptimArgs<double>* params, int64_t count, const int64_t* rows, int64_t begin,   \
                int64_t end, int64_t part, int64_t parts, int64_t to_step);                           \
  /* Adam, every row: rows [row_begin, row_end) with the sorted gradient rows merged in. */            \
  void dense_adam(const OptimArgs<float>& o, const int64_t* rows, const float* grads, int64_t num_rows, \
                  int64_t row_begin, int64_t row_end);                                                  \
  void dense_adam(const OptimArgs<double>& o, const int64_t* rows, const double* grads, int64_t num_rows, \
                  int64_t row_begin, int64_t row_end);                                                  \
  }

PEP_DECLARE_OPTIM_KERNELS(rows_base)
PEP_DECLARE_OPTIM_KERNELS(rows_avx2)

}  // namespace pep_kernels
