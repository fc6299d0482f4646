// The one registration file: schemas of every pep_kernels C++ op and their CPU kernels.
// Fake (meta) kernels and autograd are registered in Python (pep_kernels/ops/).
#include <torch/library.h>

#include "soft_threshold.h"

TORCH_LIBRARY(pep_kernels, m) {
  m.def("cpu_forward(Tensor ids, Tensor weight, Tensor threshold, str mode, float gk) -> Tensor");
  m.def("cpu_backward(Tensor grad_out, Tensor ids, Tensor weight, Tensor threshold, str mode, float gk, "
        "bool sparse) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pep_kernels, CPU, m) {
  m.impl("cpu_forward", &pep_kernels::cpu_forward);
  m.impl("cpu_backward", &pep_kernels::cpu_backward);
}
