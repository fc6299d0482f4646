// The one registration file: the schema of every pep_kernels op and its C++ kernels (CPU; the
// store's CUDA kernels on CUDA builds). The Triton kernels of the lookup and optimizer ops are
// registered for CUDA from Python, as are the fake kernels (pep_kernels/ops/).
#include <torch/library.h>

#include "optim.h"
#include "soft_threshold.h"
#include "soft_threshold_bag.h"
#include "store.h"

TORCH_LIBRARY(pep_kernels, m) {
  // The soft-threshold lookup (PEP_SPEC sections 1-2). ids are flat; with field_offsets (F + 1
  // row offsets) they are per-field local ids, lookup k in field k % F. The forward returns the
  // output and the rows it read, which the backward takes. id_errors (int64 [5]) is where the
  // CUDA kernels record an out-of-range id instead of reading it (pep_kernels/ops/indices.py); the
  // CPU kernels raise at once.
  m.def("soft_threshold_forward(Tensor ids, Tensor weight, Tensor threshold, str threshold_mode, float gk, "
        "Tensor? field_offsets, Tensor(a!)? id_errors) -> (Tensor, Tensor)");
  m.def("soft_threshold_backward(Tensor grad_out, Tensor rows, Tensor weight, Tensor threshold, str threshold_mode, float gk, "
        "bool sparse) -> (Tensor, Tensor, Tensor)");
  // A table with a fused row optimizer: the forward (rows caught up under `fast` Adam) and the
  // backward that applies step `step + 1` and increments `step`.
  m.def("soft_threshold_train_forward(Tensor ids, Tensor(a!)[] weight_state, Tensor(b!)[] threshold_state, "
        "Tensor schedule, Tensor step, str threshold_mode, float gk, Tensor? field_offsets, str kind, float[] hparams, "
        "Tensor(c!)? id_errors) -> (Tensor, Tensor)");
  m.def("soft_threshold_backward_step(Tensor grad_out, Tensor rows, Tensor(a!)[] weight_state, "
        "Tensor(b!)[] threshold_state, Tensor schedule, Tensor(c!) step, str threshold_mode, float gk, str kind, "
        "float[] hparams, Tensor(d!)? id_errors) -> Tensor");
  m.def("soft_threshold_count_nonzero(Tensor weight, Tensor threshold, str threshold_mode, float gk, Tensor field_offsets) "
        "-> Tensor");
  // MaskedEmbedding: a fixed mask instead of thresholds.
  m.def("masked_embedding_forward(Tensor ids, Tensor weight, Tensor keep, Tensor? field_offsets, "
        "Tensor(a!)? id_errors) -> (Tensor, Tensor)");
  m.def("masked_embedding_backward(Tensor grad_out, Tensor rows, Tensor keep) -> Tensor");
  // The soft-thresholded EmbeddingBag: ids pooled per bag (bag_offsets: int64 (B + 1,)), with
  // optional per-sample weights (sum), "sum" or "mean" pooling, padding_idx -1 for none.
  m.def("soft_threshold_bag_forward(Tensor ids, Tensor bag_offsets, Tensor? per_sample_weights, Tensor weight, "
        "Tensor threshold, str threshold_mode, float gk, str pooling, int padding_idx, Tensor(a!)? id_errors) -> Tensor");
  m.def("soft_threshold_bag_backward(Tensor grad_out, Tensor ids, Tensor bag_offsets, Tensor? per_sample_weights, "
        "Tensor weight, Tensor threshold, str threshold_mode, float gk, str pooling, int padding_idx, bool sparse) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("soft_threshold_bag_train_forward(Tensor ids, Tensor bag_offsets, Tensor? per_sample_weights, "
        "Tensor(a!)[] weight_state, Tensor(b!)[] threshold_state, Tensor schedule, Tensor step, str threshold_mode, "
        "float gk, str pooling, int padding_idx, str kind, float[] hparams, Tensor(c!)? id_errors) -> Tensor");
  m.def("soft_threshold_bag_backward_step(Tensor grad_out, Tensor ids, Tensor bag_offsets, "
        "Tensor? per_sample_weights, Tensor(a!)[] weight_state, Tensor(b!)[] threshold_state, Tensor schedule, "
        "Tensor(c!) step, str threshold_mode, float gk, str pooling, int padding_idx, str kind, float[] hparams, "
        "Tensor(d!)? id_errors) -> Tensor");
  m.def("row_optimizer_step(Tensor(a!)[] state, Tensor rows, Tensor grads, Tensor schedule, str kind, "
        "float[] hparams, int step) -> ()");
  m.def("row_optimizer_catch_up(Tensor(a!)[] state, Tensor? rows, Tensor schedule, float[] hparams, "
        "int to_step) -> ()");
  m.def("store_encode(Tensor weight, str encoding, str values, bool wide_offsets) -> (Tensor, Tensor)");
  m.def("store_row_dims(Tensor offsets, Tensor payload, int dim, str encoding, str values) -> Tensor");
  m.def("store_lookup(Tensor offsets, Tensor payload, Tensor ids, int dim, str encoding, str values) -> Tensor");
  m.def("store_lookup_bag(Tensor offsets, Tensor payload, Tensor ids, Tensor bag_offsets, "
        "Tensor? per_sample_weights, int dim, str encoding, str values, str mode) -> Tensor");
}

TORCH_LIBRARY_IMPL(pep_kernels, CPU, m) {
  m.impl("soft_threshold_forward", &pep_kernels::soft_threshold_forward);
  m.impl("soft_threshold_backward", &pep_kernels::soft_threshold_backward);
  m.impl("soft_threshold_train_forward", &pep_kernels::soft_threshold_train_forward);
  m.impl("soft_threshold_backward_step", &pep_kernels::soft_threshold_backward_step);
  m.impl("soft_threshold_count_nonzero", &pep_kernels::soft_threshold_count_nonzero);
  m.impl("masked_embedding_forward", &pep_kernels::masked_embedding_forward);
  m.impl("masked_embedding_backward", &pep_kernels::masked_embedding_backward);
  m.impl("soft_threshold_bag_forward", &pep_kernels::soft_threshold_bag_forward);
  m.impl("soft_threshold_bag_train_forward", &pep_kernels::soft_threshold_bag_train_forward);
  m.impl("soft_threshold_bag_backward", &pep_kernels::soft_threshold_bag_backward);
  m.impl("soft_threshold_bag_backward_step", &pep_kernels::soft_threshold_bag_backward_step);
  m.impl("row_optimizer_step", &pep_kernels::row_optimizer_step);
  m.impl("row_optimizer_catch_up", &pep_kernels::row_optimizer_catch_up);
  m.impl("store_encode", &pep_kernels::store_encode);
  m.impl("store_row_dims", &pep_kernels::store_row_dims);
  m.impl("store_lookup", &pep_kernels::store_lookup);
  m.impl("store_lookup_bag", &pep_kernels::store_lookup_bag);
}

#if defined(PEP_KERNELS_WITH_CUDA)
TORCH_LIBRARY_IMPL(pep_kernels, CUDA, m) {
  m.impl("store_lookup", &pep_kernels::store_lookup_cuda);
  m.impl("store_lookup_bag", &pep_kernels::store_lookup_bag_cuda);
}
#endif
