// Soft-threshold embedding lookup (PEP_SPEC sections 1-2): the CPU kernels of the pep_kernels
// lookup ops (schemas in ops.cpp; the CUDA kernels are Triton launchers registered from Python).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace pep_kernels {

// out[k, :] = sign(W[r_k]) * relu(|W[r_k]| - gk * sigmoid(s[...])), shape (n, d), and the rows r_k
// themselves (n,): `ids`, or with field_offsets (F + 1 row offsets) ids[k] + field_offsets[k % F]
// for per-field local ids. int32 rows when the table has fewer than 2^31 - 1 rows, else int64.
// A bad id raises IndexError (on CPU `id_errors`, the device-side record of the CUDA kernels, is
// not used).
std::tuple<at::Tensor, at::Tensor> soft_threshold_forward(const at::Tensor& ids, const at::Tensor& weight,
                                                          const at::Tensor& threshold, std::string_view mode,
                                                          double gk, const std::optional<at::Tensor>& field_offsets,
                                                          const std::optional<at::Tensor>& id_errors);

// (grad_weight, grad_threshold, rows) from the forward's rows: dense gradients and empty rows, or
// with `sparse` the gradients of the sorted distinct looked-up rows. Deterministic: each row is
// owned by one task that sums its lookups in order.
std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_threshold_backward(
    const at::Tensor& grad_out, const at::Tensor& rows, const at::Tensor& weight, const at::Tensor& threshold,
    std::string_view mode, double gk, bool sparse);

// The forward of a table that trains with a fused row optimizer (state as in optim.h): under
// `fast` Adam (kind "adam") the looked-up rows are first caught up to step `step` (a 0-d int64
// tensor: the steps taken), in place. Returns what soft_threshold_forward returns.
std::tuple<at::Tensor, at::Tensor> soft_threshold_train_forward(
    const at::Tensor& ids, at::TensorList weight_state, at::TensorList threshold_state, const at::Tensor& schedule,
    const at::Tensor& step, std::string_view mode, double gk, const std::optional<at::Tensor>& field_offsets,
    std::string_view kind, at::ArrayRef<double> hparams, const std::optional<at::Tensor>& id_errors);

// The backward fused with the row optimizer (kind sgd, adagrad, rowwise_adagrad, adam or
// adam_dense): applies step `step + 1` to the looked-up rows of weight_state[0] (and of a
// per-row threshold_state[0]; adam_dense: to every row), then increments `step`. No table
// gradient is made. Returns the gradient of a shared threshold (empty for per-row thresholds),
// for an ordinary optimizer. (id_errors: where the CUDA kernels record a step past the Adam
// schedule; the CPU kernel raises.)
at::Tensor soft_threshold_backward_step(const at::Tensor& grad_out, const at::Tensor& rows,
                                        at::TensorList weight_state, at::TensorList threshold_state,
                                        const at::Tensor& schedule, const at::Tensor& step, std::string_view mode,
                                        double gk, std::string_view kind, at::ArrayRef<double> hparams,
                                        const std::optional<at::Tensor>& id_errors);

// Non-zeros of the soft-thresholded table S(weight, threshold); field_offsets (F + 1 row
// offsets) places the rows in fields for the field modes and is ignored otherwise. A 0-d int64.
at::Tensor soft_threshold_count_nonzero(const at::Tensor& weight, const at::Tensor& threshold, std::string_view mode,
                                        double gk, const at::Tensor& field_offsets);

// MaskedEmbedding (the retrain's fixed mask): out[k] = W[r_k] * keep[r_k], and the rows, as
// soft_threshold_forward returns them.
std::tuple<at::Tensor, at::Tensor> masked_embedding_forward(const at::Tensor& ids, const at::Tensor& weight,
                                                            const at::Tensor& keep,
                                                            const std::optional<at::Tensor>& field_offsets,
                                                            const std::optional<at::Tensor>& id_errors);

// The dense gradient of W: the lookups' gradients times the mask, summed per row.
at::Tensor masked_embedding_backward(const at::Tensor& grad_out, const at::Tensor& rows, const at::Tensor& keep);

}  // namespace pep_kernels
