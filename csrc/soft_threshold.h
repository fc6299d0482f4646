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

}  // namespace pep_kernels
