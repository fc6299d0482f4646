// Row-sparse optimizer updates of a table parameter: the element rules and their raw-pointer row
// loops, compiled per instruction set like the soft-threshold row loops.
#pragma once

#include <cmath>
#include <cstdint>

namespace pep_kernels {

enum class RowOptim { SGD, Adagrad, RowwiseAdagrad, Adam, AdamDense };

// `fast` Adam catches a row up over a long gap in closed-form segments of up to
// kSegmentSteps steps (csrc/optim_rows.inc). The coefficients of a segment of `length` steps
// that depend on the length only, computed in double from the hyper-parameters as given.
constexpr int64_t kSegmentSteps = 256;

template <typename T>
struct SegmentPowers {
  T length_wd_6;                       // length * weight_decay / 6 (Simpson's rule)
  T beta1_l, momentum_sum;             // beta1^length, sum_{i=1..length} beta1^i
  T beta2_i[3], one_minus_beta2_i[3];  // beta2^i at i = 1, (length + 1) / 2, length
};

template <typename T>
inline SegmentPowers<T> segment_powers(double beta1, double beta2, double weight_decay, int64_t length) {
  const int64_t at[3] = {1, (length + 1) / 2, length};
  SegmentPowers<T> s;
  s.length_wd_6 = static_cast<T>(length * weight_decay / 6.0);
  s.beta1_l = static_cast<T>(std::pow(beta1, length));
  s.momentum_sum = static_cast<T>(beta1 * (1.0 - std::pow(beta1, length)) / (1.0 - beta1));
  for (int k = 0; k < 3; ++k) {
    s.beta2_i[k] = static_cast<T>(std::pow(beta2, at[k]));
    s.one_minus_beta2_i[k] = static_cast<T>(1.0 - std::pow(beta2, at[k]));
  }
  return s;
}

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
  double beta1_exact, beta2_exact, weight_decay_exact;  // as given, for a short last segment
  SegmentPowers<T> full_segment;                        // Adam: a segment of kSegmentSteps
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
