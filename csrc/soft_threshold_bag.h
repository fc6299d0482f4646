// Soft-thresholded EmbeddingBag (PEP tables pooled by sum or mean, as nn.EmbeddingBag): CPU kernels.
//
// Bag b pools lookups k = bag_offsets[b] .. bag_offsets[b + 1] - 1 (int64 (B + 1,) offsets from
// 0 to ids.numel(), non-decreasing): the sum of scale_k * S(W[ids[k]], t) (scale_k its per-sample
// weight, or 1), or their mean. A lookup of row padding_idx (-1: none) is left out: it adds
// nothing, counts in no mean and gets no gradient. An empty bag is zeros. Threshold modes global,
// dimension, feature, feature_dim (a bag has no field axis). No (lookups, d) intermediate is made.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace pep_kernels {

// (B, d).
at::Tensor soft_threshold_bag_forward(const at::Tensor& ids, const at::Tensor& bag_offsets,
                                      const std::optional<at::Tensor>& per_sample_weights, const at::Tensor& weight,
                                      const at::Tensor& threshold, std::string_view mode, double gk,
                                      std::string_view pooling, int64_t padding_idx);

// (grad_weight, grad_threshold, rows, grad_per_sample_weights): dense gradients and empty rows, or
// with `sparse` the gradients of the sorted distinct rows the lookups reach (padding excluded);
// the gradient of each per-sample weight (empty without them). Deterministic: each row is owned
// by one task and sums its lookups in a fixed order.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_threshold_bag_backward(
    const at::Tensor& grad_out, const at::Tensor& ids, const at::Tensor& bag_offsets,
    const std::optional<at::Tensor>& per_sample_weights, const at::Tensor& weight, const at::Tensor& threshold,
    std::string_view mode, double gk, std::string_view pooling, int64_t padding_idx, bool sparse);

// The backward fused with step `step + 1` of a row optimizer (kind sgd, adagrad, rowwise_adagrad,
// adam or adam_dense, see optim.h): the rows the lookups reach of weight_state[0] (and of a
// per-row threshold_state[0]) are updated in place (adam_dense: every row), then `step`, a 0-d
// int64 tensor counting the steps taken, is incremented. Returns the gradient of a shared
// threshold (empty for per-row thresholds), for an ordinary optimizer.
at::Tensor soft_threshold_bag_backward_step(const at::Tensor& grad_out, const at::Tensor& ids,
                                            const at::Tensor& bag_offsets,
                                            const std::optional<at::Tensor>& per_sample_weights,
                                            at::TensorList weight_state, at::TensorList threshold_state,
                                            const at::Tensor& schedule, const at::Tensor& step, std::string_view mode,
                                            double gk, std::string_view pooling, int64_t padding_idx,
                                            std::string_view kind, at::ArrayRef<double> hparams);

}  // namespace pep_kernels
