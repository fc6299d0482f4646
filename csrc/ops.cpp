// The one registration file: schemas of every pep_kernels C++ op and their CPU kernels.
// Fake (meta) kernels and autograd are registered in Python (pep_kernels/ops/).
#include <torch/library.h>

#include "optim.h"
#include "soft_threshold.h"
#include "soft_threshold_bag.h"
#include "store.h"

TORCH_LIBRARY(pep_kernels, m) {
  m.def("cpu_forward(Tensor ids, Tensor weight, Tensor threshold, str mode, float gk) -> Tensor");
  m.def("cpu_backward(Tensor grad_out, Tensor ids, Tensor weight, Tensor threshold, str mode, float gk, "
        "bool sparse) -> (Tensor, Tensor, Tensor)");
  m.def("cpu_backward_step(Tensor grad_out, Tensor ids, Tensor(a!)[] weight_state, Tensor(b!)[] threshold_state, "
        "Tensor schedule, str mode, float gk, str kind, float[] hparams, int step) -> Tensor");
  m.def("soft_threshold_bag_forward(Tensor ids, Tensor bag_offsets, Tensor? per_sample_weights, Tensor weight, "
        "Tensor threshold, str mode, float gk, str pooling, int padding_idx) -> Tensor");
  m.def("soft_threshold_bag_backward(Tensor grad_out, Tensor ids, Tensor bag_offsets, Tensor? per_sample_weights, "
        "Tensor weight, Tensor threshold, str mode, float gk, str pooling, int padding_idx, bool sparse) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("soft_threshold_bag_backward_step(Tensor grad_out, Tensor ids, Tensor bag_offsets, "
        "Tensor? per_sample_weights, Tensor(a!)[] weight_state, Tensor(b!)[] threshold_state, Tensor schedule, "
        "Tensor(c!) step, str mode, float gk, str pooling, int padding_idx, str kind, float[] hparams) -> Tensor");
  m.def("cpu_count_nonzero(Tensor weight, Tensor threshold, str mode, float gk, Tensor field_offsets) -> Tensor");
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
  m.impl("cpu_forward", &pep_kernels::cpu_forward);
  m.impl("cpu_backward", &pep_kernels::cpu_backward);
  m.impl("cpu_backward_step", &pep_kernels::cpu_backward_step);
  m.impl("soft_threshold_bag_forward", &pep_kernels::soft_threshold_bag_forward);
  m.impl("soft_threshold_bag_backward", &pep_kernels::soft_threshold_bag_backward);
  m.impl("soft_threshold_bag_backward_step", &pep_kernels::soft_threshold_bag_backward_step);
  m.impl("cpu_count_nonzero", &pep_kernels::cpu_count_nonzero);
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
