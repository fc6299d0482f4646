// Soft-threshold embedding lookup (PEP_SPEC sections 1-2): CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <string_view>
#include <tuple>

namespace pep_kernels {

// out[n, :] = sign(W[ids[n]]) * relu(|W[ids[n]]| - gk * sigmoid(s[...])), shape (n, d).
at::Tensor cpu_forward(const at::Tensor& ids, const at::Tensor& weight, const at::Tensor& threshold,
                       std::string_view mode, double gk);

// (grad_weight, grad_threshold, rows): dense gradients and empty rows, or with `sparse` the
// gradients of the sorted distinct looked-up rows. Deterministic: each row is owned by one task.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_backward(
    const at::Tensor& grad_out, const at::Tensor& ids, const at::Tensor& weight,
    const at::Tensor& threshold, std::string_view mode, double gk, bool sparse);

// The backward fused with a row optimizer step (kind sgd, adagrad, rowwise_adagrad or adam, see
// optim.h): the looked-up rows of weight_state[0] (and of a per-row threshold_state[0]) are
// updated in place and no table gradient is made. Returns the gradient of a shared threshold
// (empty for per-row thresholds), for an ordinary optimizer.
at::Tensor cpu_backward_step(const at::Tensor& grad_out, const at::Tensor& ids, at::TensorList weight_state,
                             at::TensorList threshold_state, const at::Tensor& schedule, std::string_view mode,
                             double gk, std::string_view kind, at::ArrayRef<double> hparams, int64_t step);

// Non-zeros of the soft-thresholded table S(weight, threshold); field_offsets (F + 1 row
// offsets) places the rows in fields for the field modes and is ignored otherwise. A 0-d int64.
at::Tensor cpu_count_nonzero(const at::Tensor& weight, const at::Tensor& threshold, std::string_view mode, double gk,
                          const at::Tensor& field_offsets);

}  // namespace pep_kernels
