// Row-sparse optimizer updates of a table parameter: the element rules and their raw-pointer row
// loops, compiled per instruction set like the soft-threshold row loops.
#pragma once

#include <cstdint>

namespace pep_kernels {

enum class RowOptim { SGD, Adagrad, RowwiseAdagrad, Adam, AdamDense };

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
  T lr, eps, weight_decay;
  T beta2, one_minus_beta1, one_minus_beta2;  // 1 - beta rounded from double, as torch passes them
  int64_t step;  // the step being applied, from 1
};

#define PEP_DECLARE_OPTIM_KERNELS(ns)                                                                   \
  namespace ns {                                                                                        \
  /* Applies step `o.step` to rows[i] with loss gradient grads[i] (rows sorted or not, distinct). */    \
  void apply_rows(const OptimArgs<float>& o, const int64_t* rows, const float* grads, int64_t begin,  \
                  int64_t end);                                                                         \
  void apply_rows(const OptimArgs<double>& o, const int64_t* rows, const double* grads, int64_t begin, \
                  int64_t end);                                                                         \
  /* Adam: replays, for rows[i] (or row i when rows is null), the steps up to `to_step` that the row */ \
  /* was not in a batch: the update with a zero loss gradient, exactly as a dense step makes it. */    \
  void catch_up(const OptimArgs<float>& o, const int64_t* rows, int64_t begin, int64_t end, int64_t to_step); \
  void catch_up(const OptimArgs<double>& o, const int64_t* rows, int64_t begin, int64_t end, int64_t to_step); \
  /* Adam, every row: rows [row_begin, row_end) with the sorted gradient rows merged in. */            \
  void dense_adam(const OptimArgs<float>& o, const int64_t* rows, const float* grads, int64_t num_rows, \
                  int64_t row_begin, int64_t row_end);                                                  \
  void dense_adam(const OptimArgs<double>& o, const int64_t* rows, const double* grads, int64_t num_rows, \
                  int64_t row_begin, int64_t row_end);                                                  \
  }

PEP_DECLARE_OPTIM_KERNELS(rows_base)
PEP_DECLARE_OPTIM_KERNELS(rows_avx2)

}  // namespace pep_kernels
