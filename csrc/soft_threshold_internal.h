// Helpers the CPU soft-threshold ops share (soft_threshold_cpu.cpp: lookups; soft_threshold_bag_cpu.cpp:
// bags): argument checks, the threshold's kernel view, the sort of the backward, the fused step.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string_view>
#include <utility>

#include "optim_rows.h"
#include "soft_threshold_rows.h"

namespace pep_kernels {

Layout parse_mode(std::string_view mode);

// The threshold as (rows, 1 or d) whatever its mode's shape, checked against the table; `n` lookups.
at::Tensor threshold_2d(const at::Tensor& threshold, const at::Tensor& weight, Layout layout, int64_t n);

// dtypes, dims and devices of a CPU lookup: 1-D int32/int64 ids, a 2-D float32/float64 table.
void check_inputs(const at::Tensor& ids, const at::Tensor& weight, const at::Tensor& threshold);

template <typename index_t>
void check_ids(const index_t* ids, int64_t n, int64_t num_rows) {
  for (int64_t k = 0; k < n; ++k) {
    const int64_t id = ids[k];
    TORCH_CHECK_INDEX(id >= 0 && id < num_rows, "index ", id, " is out of range for a table of ", num_rows,
                      " rows (valid ids are 0..", num_rows - 1, ")");
  }
}

// Grain of at::parallel_for: about 32K elements per task, so small batches stay on one thread.
int64_t grain(int64_t elements_per_item);

// (sorted ids, their positions): a stable sort of int64 ids in [0, num_rows).
std::pair<at::Tensor, at::Tensor> sort_ids(const at::Tensor& ids, int64_t num_rows);

// The gradient of a shared threshold (global, dimension, field modes) from the backward's
// per-lookup terms `contrib` (n, d) = G * sign(W) * [|W| > t], in the threshold's shape.
at::Tensor shared_threshold_grad(const at::Tensor& contrib, const at::Tensor& s, Layout layout, double gk,
                                 at::IntArrayRef threshold_sizes);

// A fused optimizer step for the backward: the table's and the per-row threshold's states.
struct FusedStep {
  at::TensorList weight_state, threshold_state;
  const at::Tensor& schedule;
  RowOptim kind;
  at::ArrayRef<double> hparams;
  int64_t step;
};

// The steps taken, from the training ops' `step` (a 0-d int64 tensor on the table's device), after
// checking that both states start with their parameter.
int64_t steps_taken(at::TensorList weight_state, at::TensorList threshold_state, const at::Tensor& step);

// `fast` Adam (kind "adam") before a forward: brings the `rows` the lookups read of W and of a
// per-row threshold up to step `steps`, in one pass over the rows. Nothing for other kinds.
void catch_up_rows(at::TensorList weight_state, at::TensorList threshold_state, const at::Tensor& rows,
                   const at::Tensor& schedule, RowOptim kind, at::ArrayRef<double> hparams, int64_t steps);

// `adam_dense` (faithful Adam): every row of W and of a per-row threshold takes the step, with the
// gradients `grad_w`, `grad_s` of the sorted distinct `rows` the lookups reach. Both states are
// checked before either moves.
void dense_step(const FusedStep& step, bool per_row, const at::Tensor& rows, const at::Tensor& grad_w,
                const at::Tensor& grad_s);

}  // namespace pep_kernels
