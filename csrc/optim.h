// Row-sparse optimizers of table parameters (CPU): ops and the argument checks they share with
// the fused backward.
#pragma once

#include <ATen/core/Tensor.h>

#include <string_view>

#include "optim_rows.h"

namespace pep_kernels {

RowOptim parse_optim(std::string_view kind);

// The kernel view of `state` = [param, state1, state2, last_step] (unused ones empty), checked:
// shapes, dtypes, contiguity, and a schedule (2, >= step + 1) of Adam's per-step factors.
// hparams = [lr, eps, weight_decay, beta1, beta2].
template <typename T>
OptimArgs<T> optim_args(at::TensorList state, const at::Tensor& schedule, RowOptim kind,
                        at::ArrayRef<double> hparams, int64_t step);

// Applies step `step` to the sorted distinct `rows` of state[0] with their loss gradients
// `grads`; "adam_dense" also updates every other row, with a zero loss gradient.
void row_optimizer_step(at::TensorList state, const at::Tensor& rows, const at::Tensor& grads,
                        const at::Tensor& schedule, std::string_view kind, at::ArrayRef<double> hparams,
                        int64_t step);

// Adam ("adam"): brings `rows` (any ids, duplicates allowed; all rows when absent) up to step
// `to_step`; `state` is [param, exp_avg, exp_avg_sq, last_step] of one or more parameters with the
// same rows (W and per-row thresholds, caught up in one pass over the ids).
void row_optimizer_catch_up(at::TensorList state, const std::optional<at::Tensor>& rows,
                            const at::Tensor& schedule, at::ArrayRef<double> hparams, int64_t to_step);

}  // namespace pep_kernels
