// The ATen binding of the SparseRowStore CUDA kernels (csrc/cuda/store.cu): tensor checks, the
// current stream, launch errors. Compiled into CUDA builds only (setup.py's PEP_KERNELS_WITH_CUDA).
#if defined(PEP_KERNELS_WITH_CUDA)

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "cuda/store_cuda.h"
#include "store.h"

namespace pep_kernels {
namespace {

struct CudaStore {
  at::Tensor offsets, payload, ids;
  store_cuda::StoreArgs store;
  store_cuda::IdArgs id_args;
};

CudaStore cuda_store(const at::Tensor& offsets_in, const at::Tensor& payload_in, const at::Tensor& ids_in,
                     int64_t dim, std::string_view encoding, std::string_view values) {
  const store::Format format = parse_format(dim, encoding, values);
  TORCH_CHECK_TYPE(offsets_in.scalar_type() == at::kInt || offsets_in.scalar_type() == at::kLong,
                   "store offsets must be int32 or int64, got ", offsets_in.scalar_type());
  TORCH_CHECK_TYPE(payload_in.scalar_type() == at::kByte, "a store payload must be uint8, got ",
                   payload_in.scalar_type());
  TORCH_CHECK_TYPE(ids_in.scalar_type() == at::kInt || ids_in.scalar_type() == at::kLong,
                   "ids must be int32 or int64, got ", ids_in.scalar_type());
  TORCH_CHECK_VALUE(offsets_in.dim() == 1 && offsets_in.numel() >= 2 && payload_in.dim() == 1 && ids_in.dim() == 1,
                    "offsets (N + 1 >= 2), payload and ids must be 1-D");
  TORCH_CHECK_VALUE(offsets_in.is_cuda() && payload_in.device() == offsets_in.device() &&
                        ids_in.device() == offsets_in.device(),
                    "the CUDA store ops need the store and the ids on one CUDA device");
  CudaStore s{offsets_in.contiguous(), payload_in.contiguous(), ids_in.contiguous(), {}, {}};
  s.store = {s.offsets.data_ptr(), s.offsets.scalar_type() == at::kLong, s.payload.data_ptr<uint8_t>(),
             s.payload.numel(), s.offsets.numel() - 1, format};
  s.id_args = {s.ids.data_ptr(), s.ids.scalar_type() == at::kLong, s.ids.numel()};
  return s;
}

void check_launch(int error) {
  C10_CUDA_CHECK(static_cast<cudaError_t>(error));
}

}  // namespace

at::Tensor store_lookup_cuda(const at::Tensor& offsets, const at::Tensor& payload, const at::Tensor& ids, int64_t dim,
                             std::string_view encoding, std::string_view values) {
  const CudaStore s = cuda_store(offsets, payload, ids, dim, encoding, values);
  const c10::cuda::CUDAGuard guard(offsets.device());
  at::Tensor out = at::empty({ids.numel(), dim}, payload.options().dtype(at::kFloat));
  check_launch(store_cuda::launch_lookup(s.store, s.id_args, out.data_ptr<float>(),
                                         c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

at::Tensor store_lookup_bag_cuda(const at::Tensor& offsets, const at::Tensor& payload, const at::Tensor& ids,
                                 const at::Tensor& bag_offsets_in, const std::optional<at::Tensor>& per_sample_weights,
                                 int64_t dim, std::string_view encoding, std::string_view values,
                                 std::string_view mode) {
  const CudaStore s = cuda_store(offsets, payload, ids, dim, encoding, values);
  const bool mean = parse_bag_mean(mode);
  TORCH_CHECK_TYPE(bag_offsets_in.scalar_type() == at::kLong, "bag offsets must be int64, got ",
                   bag_offsets_in.scalar_type());
  TORCH_CHECK_VALUE(bag_offsets_in.dim() == 1 && bag_offsets_in.numel() >= 1 &&
                        bag_offsets_in.device() == offsets.device(),
                    "bag offsets must be 1-D (B + 1 entries) on the store's device");
  const at::Tensor bag_offsets = bag_offsets_in.contiguous();
  at::Tensor weights;
  if (per_sample_weights.has_value()) {
    TORCH_CHECK_VALUE(!mean, "per_sample_weights need mode 'sum'");
    TORCH_CHECK_TYPE(per_sample_weights->scalar_type() == at::kFloat, "per_sample_weights must be float32");
    TORCH_CHECK_VALUE(per_sample_weights->dim() == 1 && per_sample_weights->numel() == ids.numel() &&
                          per_sample_weights->device() == offsets.device(),
                      "per_sample_weights must be 1-D, one per id, on the store's device");
    weights = per_sample_weights->contiguous();
  }
  const c10::cuda::CUDAGuard guard(offsets.device());
  const int64_t num_bags = bag_offsets.numel() - 1;
  at::Tensor out = at::empty({num_bags, dim}, payload.options().dtype(at::kFloat));
  check_launch(store_cuda::launch_lookup_bag(s.store, s.id_args, bag_offsets.data_ptr<int64_t>(), num_bags,
                                             weights.defined() ? weights.data_ptr<float>() : nullptr, mean,
                                             out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

}  // namespace pep_kernels

#endif  // PEP_KERNELS_WITH_CUDA
