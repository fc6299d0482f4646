#include "soft_threshold.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <array>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_features.h"
#include "optim.h"
#include "soft_threshold_internal.h"
#include "soft_threshold_rows.h"

namespace pep_kernels {

Layout parse_mode(std::string_view mode) {
  if (mode == "global") return {RowSource::Shared, false};
  if (mode == "dimension") return {RowSource::Shared, true};
  if (mode == "feature") return {RowSource::PerRow, false};
  if (mode == "feature_dim") return {RowSource::PerRow, true};
  if (mode == "field") return {RowSource::PerField, false};
  if (mode == "field_dim") return {RowSource::PerField, true};
  TORCH_CHECK_VALUE(false, "unknown threshold mode '", mode,
                    "'; expected global, dimension, feature, feature_dim, field or field_dim");
}

// The threshold as (rows, 1 or d) whatever its mode's shape, checked against the table.
at::Tensor threshold_2d(const at::Tensor& threshold, const at::Tensor& weight, Layout layout, int64_t n) {
  const int64_t d = weight.size(1);
  const int64_t cols = layout.per_dim ? d : 1;
  at::Tensor s = threshold.dim() == 1 ? threshold.reshape({1, -1}) : threshold;
  TORCH_CHECK_VALUE(s.dim() == 2 && s.size(1) == cols, "threshold has shape ", threshold.sizes(),
                    ", which does not fit its mode for a table of dim ", d);
  if (layout.rows == RowSource::Shared) {
    TORCH_CHECK_VALUE(threshold.dim() == 1, "a shared threshold must be 1-D, got ", threshold.sizes());
  } else if (layout.rows == RowSource::PerRow) {
    TORCH_CHECK_VALUE(s.size(0) == weight.size(0), "a per-row threshold needs ", weight.size(0),
                      " rows, got ", s.size(0));
  } else {
    TORCH_CHECK_VALUE(s.size(0) > 0 && n % s.size(0) == 0, "a per-field threshold of ", s.size(0),
                      " fields needs a lookup count divisible by it, got ", n);
  }
  return s;
}

void check_inputs(const at::Tensor& ids, const at::Tensor& weight, const at::Tensor& threshold) {
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
                   "ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble,
                   "the CPU kernel takes float32 or float64 weights, got ", weight.scalar_type(),
                   " (use the Triton or reference backend for half precision)");
  TORCH_CHECK_TYPE(threshold.scalar_type() == weight.scalar_type(), "threshold dtype ",
                   threshold.scalar_type(), " must match weight dtype ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D, got ", weight.sizes());
  TORCH_CHECK_VALUE(ids.dim() == 1, "ids must be 1-D, got ", ids.sizes());
  TORCH_CHECK_VALUE(ids.device().is_cpu() && weight.device().is_cpu() && threshold.device().is_cpu(),
                    "the CPU kernel needs CPU tensors");
}

int64_t grain(int64_t elements_per_item) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(elements_per_item, 1)); }

namespace {

// The rows the lookups read: `ids` (checked), or per-field local ids offset by their field's first
// row (lookup k is in field k % F; each id checked against its field's size). int32 when every
// row id fits, as the CUDA kernels write them (int32 keys sort faster there).
at::Tensor lookup_rows(const at::Tensor& ids, const std::optional<at::Tensor>& field_offsets_in, int64_t num_rows) {
  const bool narrow = num_rows < std::numeric_limits<int32_t>::max();
  const auto dtype = narrow ? at::kInt : at::kLong;
  if (!field_offsets_in.has_value()) {
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "pep_lookup_rows", [&] {
      check_ids(ids.data_ptr<index_t>(), ids.numel(), num_rows);
    });
    return ids.to(dtype);
  }
  const at::Tensor field_offsets = field_offsets_in->to(at::kLong).contiguous();
  const int64_t num_fields = field_offsets.numel() - 1, n = ids.numel();
  TORCH_CHECK_VALUE(field_offsets.dim() == 1 && num_fields >= 1, "field_offsets must be 1-D with F + 1 entries, got ",
                    field_offsets.sizes());
  TORCH_CHECK_VALUE(n % num_fields == 0, "per-field ids must come in whole samples of ", num_fields,
                    " ids (one per field), got ", n);
  const int64_t* offsets = field_offsets.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(offsets[0] == 0 && offsets[num_fields] == num_rows,
                    "field_offsets must run from 0 to the table's ", num_rows, " rows, got ", offsets[0], " .. ",
                    offsets[num_fields]);
  for (int64_t f = 0; f < num_fields; ++f) {
    TORCH_CHECK_VALUE(offsets[f] <= offsets[f + 1], "field_offsets must not decrease, got ", offsets[f], " then ",
                      offsets[f + 1]);
  }
  at::Tensor rows = at::empty({n}, ids.options().dtype(dtype));
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "pep_lookup_rows_fields", [&] {
    const index_t* local = ids.data_ptr<index_t>();
    const auto write = [&](auto* out) {
      for (int64_t k = 0; k < n; ++k) {
        const int64_t f = k % num_fields, id = local[k], size = offsets[f + 1] - offsets[f];
        TORCH_CHECK_INDEX(id >= 0 && id < size, "id ", id, " in field ", f, " is out of range: that field has ",
                          size, " values (valid local ids are 0..", size - 1, ")");
        out[k] = static_cast<std::remove_pointer_t<decltype(out)>>(offsets[f] + id);
      }
    };
    narrow ? write(rows.data_ptr<int32_t>()) : write(rows.data_ptr<int64_t>());
  });
  return rows;
}

at::Tensor forward_rows(const at::Tensor& ids_in, const at::Tensor& weight, const at::Tensor& threshold,
                        std::string_view mode, double gk) {
  check_inputs(ids_in, weight, threshold);
  const Layout layout = parse_mode(mode);
  const at::Tensor ids = ids_in.contiguous();
  const int64_t n = ids.numel(), d = weight.size(1);
  const at::Tensor s = threshold_2d(threshold, weight, layout, n);
  at::Tensor out = at::empty({n, d}, weight.options());
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "pep_cpu_forward", [&] {
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "pep_cpu_forward_ids", [&] {
      check_ids(ids.data_ptr<index_t>(), n, weight.size(0));
      const ForwardArgs<scalar_t, index_t> args{
          ids.data_ptr<index_t>(), weight.data_ptr<scalar_t>(), weight.stride(0), weight.stride(1),
          s.data_ptr<scalar_t>(), s.stride(0), s.stride(1), s.size(0), out.data_ptr<scalar_t>(), d, layout,
          static_cast<scalar_t>(gk)};
      const bool avx2 = cpu_has_avx2();
      at::parallel_for(0, n, grain(d), [&](int64_t begin, int64_t end) {
        avx2 ? rows_avx2::forward(args, begin, end) : rows_base::forward(args, begin, end);
      });
    });
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> soft_threshold_forward(const at::Tensor& ids, const at::Tensor& weight,
                                                          const at::Tensor& threshold, std::string_view mode,
                                                          double gk, const std::optional<at::Tensor>& field_offsets,
                                                          const std::optional<at::Tensor>& /*id_errors*/) {
  check_inputs(ids, weight, threshold);
  at::Tensor rows = lookup_rows(ids.contiguous(), field_offsets, weight.size(0));
  return {forward_rows(rows, weight, threshold, mode, gk), rows};
}

// (sorted ids, their positions): a stable LSD radix sort of int64 ids in [0, num_rows), 11 bits a
// pass (two passes up to 4M rows). torch's comparison sort took a tenth of a training step.
std::pair<at::Tensor, at::Tensor> sort_ids(const at::Tensor& ids, int64_t num_rows) {
  constexpr int kBits = 11;
  constexpr int64_t kRadix = int64_t{1} << kBits;
  const int64_t n = ids.numel();
  at::Tensor keys[2] = {ids.clone(), at::empty_like(ids)};
  at::Tensor order[2] = {at::arange(n, ids.options()), at::empty_like(ids)};
  int current = 0;
  for (int shift = 0; shift < 63 && ((num_rows - 1) >> shift) > 0; shift += kBits) {
    const int64_t* key = keys[current].data_ptr<int64_t>();
    const int64_t* pos = order[current].data_ptr<int64_t>();
    int64_t* key_out = keys[1 - current].data_ptr<int64_t>();
    int64_t* pos_out = order[1 - current].data_ptr<int64_t>();
    std::array<int64_t, kRadix> start{};
    for (int64_t i = 0; i < n; ++i) ++start[(key[i] >> shift) & (kRadix - 1)];
    for (int64_t digit = 0, total = 0; digit < kRadix; ++digit) total += std::exchange(start[digit], total);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t at = start[(key[i] >> shift) & (kRadix - 1)]++;
      key_out[at] = key[i];
      pos_out[at] = pos[i];
    }
    current = 1 - current;
  }
  return {keys[current], order[current]};
}

at::Tensor shared_threshold_grad(const at::Tensor& contrib, const at::Tensor& s, Layout layout, double gk,
                                 at::IntArrayRef threshold_sizes) {
  // Reduce the per-lookup terms, then the chain rule through gk * sigmoid.
  const int64_t d = contrib.size(1);
  at::Tensor total;
  if (layout.rows == RowSource::PerField) {
    at::Tensor per_field = contrib.view({-1, s.size(0), d}).sum(0);
    total = layout.per_dim ? per_field : per_field.sum(1, /*keepdim=*/true);
  } else {
    total = layout.per_dim ? contrib.sum(0) : contrib.sum().reshape({1});
  }
  // The gates by the kernels' sigmoid, not at::sigmoid (whose last bit depends on the vector width).
  const at::Tensor y = at::empty(s.sizes(), s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "pep_cpu_gates", [&] {
    rows_base::sigmoid(s.contiguous().data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), s.numel());
  });
  return (-(total.view_as(s) * gk) * (1 - y) * y).view(threshold_sizes);
}

int64_t steps_taken(at::TensorList weight_state, at::TensorList threshold_state, const at::Tensor& step) {
  TORCH_CHECK_VALUE(!weight_state.empty() && !threshold_state.empty(),
                    "weight_state and threshold_state must start with the weight and the threshold");
  TORCH_CHECK_VALUE(step.dim() == 0 && step.scalar_type() == at::kLong && step.device() == weight_state[0].device(),
                    "step must be a 0-d int64 tensor on the table's device (the steps taken), got a ",
                    step.scalar_type(), " tensor of shape ", step.sizes(), " on ", step.device());
  return step.item<int64_t>();
}

void catch_up_rows(at::TensorList weight_state, at::TensorList threshold_state, const at::Tensor& rows,
                   const at::Tensor& schedule, RowOptim kind, at::ArrayRef<double> hparams, int64_t steps) {
  if (kind != RowOptim::Adam || steps == 0) return;
  std::vector<at::Tensor> state(weight_state.begin(), weight_state.end());
  if (threshold_state.size() == 4) state.insert(state.end(), threshold_state.begin(), threshold_state.end());
  row_optimizer_catch_up(state, rows.to(at::kLong), schedule, hparams, steps);
}

void dense_step(const FusedStep& step, bool per_row, const at::Tensor& rows, const at::Tensor& grad_w,
                const at::Tensor& grad_s) {
  const at::Tensor& weight = step.weight_state[0];
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble,
                   "row optimizers take float32 or float64 parameters, got ", weight.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "pep_dense_step_check", [&] {
    optim_args<scalar_t>(step.weight_state, step.schedule, step.kind, step.hparams, step.step);
    if (per_row) optim_args<scalar_t>(step.threshold_state, step.schedule, step.kind, step.hparams, step.step);
  });
  row_optimizer_step(step.weight_state, rows, grad_w, step.schedule, "adam_dense", step.hparams, step.step);
  if (per_row) {
    row_optimizer_step(step.threshold_state, rows, grad_s, step.schedule, "adam_dense", step.hparams, step.step);
  }
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out_in, const at::Tensor& ids_in, const at::Tensor& weight,
    const at::Tensor& threshold, std::string_view mode, double gk, bool sparse, const FusedStep* fused) {
  check_inputs(ids_in, weight, threshold);
  const Layout layout = parse_mode(mode);
  const at::Tensor ids = ids_in.contiguous();
  const int64_t n = ids.numel(), d = weight.size(1), num_rows = weight.size(0);
  const at::Tensor s = threshold_2d(threshold, weight, layout, n);
  TORCH_CHECK_VALUE(grad_out_in.dim() == 2 && grad_out_in.size(0) == n && grad_out_in.size(1) == d,
                    "grad_out must have shape (", n, ", ", d, "), got ", grad_out_in.sizes());
  const at::Tensor grad_out = grad_out_in.to(weight.scalar_type()).contiguous();
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "pep_cpu_check_ids", [&] {
    check_ids(ids.data_ptr<index_t>(), n, num_rows);
  });

  // Segments of equal ids in sorted order; each is accumulated by one task in a fixed order.
  auto [sorted_ids, order] = sort_ids(ids.to(at::kLong).contiguous(), num_rows);
  auto [seg_rows, inverse, counts] = at::unique_consecutive(sorted_ids, false, /*return_counts=*/true);
  const at::Tensor seg_start = at::constant_pad_nd(at::cumsum(counts, 0), {1, 0}, 0);
  const int64_t num_segments = seg_rows.numel();
  const int64_t num_dst = sparse ? num_segments : num_rows;
  const bool per_row = layout.rows == RowSource::PerRow;
  // Sparse gradients have one row per segment, all written by the kernel: no zero fill. A fused
  // step writes no table gradient at all.
  const auto alloc = [&](int64_t cols) {
    if (fused != nullptr) return at::Tensor();
    return sparse ? at::empty({num_dst, cols}, weight.options()) : at::zeros({num_dst, cols}, weight.options());
  };
  at::Tensor grad_w = alloc(d);
  at::Tensor grad_s = per_row ? alloc(s.size(1)) : at::Tensor();
  at::Tensor contrib = per_row ? at::Tensor() : at::empty({n, d}, weight.options());

  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "pep_cpu_backward", [&] {
    OptimArgs<scalar_t> update_w{}, update_s{};
    if (fused != nullptr) {
      update_w = optim_args<scalar_t>(fused->weight_state, fused->schedule, fused->kind, fused->hparams, fused->step);
      if (per_row) {
        update_s = optim_args<scalar_t>(fused->threshold_state, fused->schedule, fused->kind, fused->hparams,
                                        fused->step);
      }
    }
    const BackwardArgs<scalar_t> args{
        seg_rows.data_ptr<int64_t>(), seg_start.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
        weight.data_ptr<scalar_t>(), weight.stride(0), weight.stride(1), s.data_ptr<scalar_t>(), s.stride(0),
        s.stride(1), s.size(0), grad_out.data_ptr<scalar_t>(), d, layout, static_cast<scalar_t>(gk), sparse,
        grad_w.defined() ? grad_w.data_ptr<scalar_t>() : nullptr,
        grad_s.defined() ? grad_s.data_ptr<scalar_t>() : nullptr,
        per_row ? nullptr : contrib.data_ptr<scalar_t>(),
        fused != nullptr ? &update_w : nullptr,
        fused != nullptr && per_row ? &update_s : nullptr};
    const bool avx2 = cpu_has_avx2();
    const int64_t per_segment = d * std::max<int64_t>(1, n / std::max<int64_t>(num_segments, 1));
    at::parallel_for(0, num_segments, grain(per_segment), [&](int64_t begin, int64_t end) {
      avx2 ? rows_avx2::backward(args, begin, end) : rows_base::backward(args, begin, end);
    });
  });

  if (!per_row) {
    grad_s = shared_threshold_grad(contrib, s, layout, gk, threshold.sizes());
  } else if (!sparse && grad_s.defined()) {
    grad_s = grad_s.view(threshold.sizes());
  }
  at::Tensor rows = sparse ? seg_rows : at::empty({0}, ids.options().dtype(at::kLong));
  return {grad_w, grad_s, rows};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_threshold_backward(
    const at::Tensor& grad_out, const at::Tensor& rows, const at::Tensor& weight, const at::Tensor& threshold,
    std::string_view mode, double gk, bool sparse) {
  return backward(grad_out, rows, weight, threshold, mode, gk, sparse, nullptr);
}

std::tuple<at::Tensor, at::Tensor> soft_threshold_train_forward(
    const at::Tensor& ids, at::TensorList weight_state, at::TensorList threshold_state, const at::Tensor& schedule,
    const at::Tensor& step, std::string_view mode, double gk, const std::optional<at::Tensor>& field_offsets,
    std::string_view kind, at::ArrayRef<double> hparams, const std::optional<at::Tensor>& id_errors) {
  const int64_t steps = steps_taken(weight_state, threshold_state, step);
  const at::Tensor& weight = weight_state[0];
  const at::Tensor& threshold = threshold_state[0];
  check_inputs(ids, weight, threshold);
  const at::Tensor rows = lookup_rows(ids.contiguous(), field_offsets, weight.size(0));
  catch_up_rows(weight_state, threshold_state, rows, schedule, parse_optim(kind), hparams, steps);
  return {forward_rows(rows, weight, threshold, mode, gk), rows};
}

at::Tensor soft_threshold_backward_step(const at::Tensor& grad_out, const at::Tensor& rows,
                                        at::TensorList weight_state, at::TensorList threshold_state,
                                        const at::Tensor& schedule, const at::Tensor& step, std::string_view mode,
                                        double gk, std::string_view kind, at::ArrayRef<double> hparams,
                                        const std::optional<at::Tensor>& /*id_errors*/) {
  const FusedStep fused{weight_state, threshold_state, schedule, parse_optim(kind), hparams,
                        steps_taken(weight_state, threshold_state, step) + 1};
  const bool per_row = parse_mode(mode).rows == RowSource::PerRow;
  at::Tensor grad_s;
  if (fused.kind == RowOptim::AdamDense) {
    auto [grad_w, grad_threshold, distinct] =
        backward(grad_out, rows, weight_state[0], threshold_state[0], mode, gk, /*sparse=*/true, nullptr);
    dense_step(fused, per_row, distinct, grad_w, grad_threshold);
    grad_s = grad_threshold;
  } else {
    grad_s = std::get<1>(backward(grad_out, rows, weight_state[0], threshold_state[0], mode, gk,
                                  /*sparse=*/true, &fused));
  }
  step.fill_(fused.step);
  return grad_s.defined() && !per_row ? grad_s : at::empty({0}, threshold_state[0].options());
}

at::Tensor soft_threshold_count_nonzero(const at::Tensor& weight, const at::Tensor& threshold, std::string_view mode,
                                        double gk, const at::Tensor& field_offsets_in) {
  check_inputs(at::empty({0}, weight.options().dtype(at::kLong)), weight, threshold);
  const Layout layout = parse_mode(mode);
  const int64_t num_rows = weight.size(0), d = weight.size(1);
  const at::Tensor field_offsets = field_offsets_in.to(at::kLong).contiguous();
  if (layout.rows == RowSource::PerField) {
    TORCH_CHECK_VALUE(field_offsets.dim() == 1 && field_offsets.numel() == threshold.size(0) + 1 &&
                          field_offsets[0].item<int64_t>() == 0 && field_offsets[-1].item<int64_t>() == num_rows,
                      "a per-field threshold needs field_offsets [0, ..., ", num_rows, "] of ", threshold.size(0) + 1,
                      " entries, got ", field_offsets.sizes());
  }
  const at::Tensor s = threshold_2d(threshold, weight, layout, threshold.size(0));
  int64_t total = 0;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "pep_cpu_count_nonzero", [&] {
    const CountArgs<scalar_t> args{weight.data_ptr<scalar_t>(), weight.stride(0), weight.stride(1),
                                   s.data_ptr<scalar_t>(), s.stride(0), s.stride(1), d, layout,
                                   static_cast<scalar_t>(gk),
                                   layout.rows == RowSource::PerField ? field_offsets.data_ptr<int64_t>() : nullptr};
    const bool avx2 = cpu_has_avx2();
    total = at::parallel_reduce(0, num_rows, grain(d), int64_t(0), [&](int64_t begin, int64_t end, int64_t acc) {
      return acc + (avx2 ? rows_avx2::count_nonzero(args, begin, end) : rows_base::count_nonzero(args, begin, end));
    }, std::plus<int64_t>());
  });
  return at::scalar_tensor(total, at::kLong);
}

}  // namespace pep_kernels

namespace pep_kernels {

std::tuple<at::Tensor, at::Tensor> masked_embedding_forward(const at::Tensor& ids, const at::Tensor& weight,
                                                            const at::Tensor& keep,
                                                            const std::optional<at::Tensor>& field_offsets,
                                                            const std::optional<at::Tensor>& /*id_errors*/) {
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
                   "ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2 && keep.sizes() == weight.sizes() && keep.scalar_type() == at::kBool,
                    "keep must be a bool mask of the weight's shape ", weight.sizes(), ", got ", keep.scalar_type(),
                    " of shape ", keep.sizes());
  TORCH_CHECK_VALUE(ids.device().is_cpu() && weight.device().is_cpu() && keep.device().is_cpu(),
                    "the CPU kernel needs CPU tensors");
  at::Tensor rows = lookup_rows(ids.reshape({-1}).contiguous(), field_offsets, weight.size(0));
  // where, not a product with the mask: a pruned entry reads +0, bit for bit the pruned table.
  at::Tensor out = at::where(keep.index_select(0, rows), weight.index_select(0, rows), at::zeros({}, weight.options()));
  return {out, rows};
}

at::Tensor masked_embedding_backward(const at::Tensor& grad_out, const at::Tensor& rows, const at::Tensor& keep) {
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == rows.numel() && grad_out.size(1) == keep.size(1),
                    "grad_out must have shape (", rows.numel(), ", ", keep.size(1), "), got ", grad_out.sizes());
  const at::Tensor masked = at::where(keep.index_select(0, rows), grad_out, at::zeros({}, grad_out.options()));
  return at::zeros({keep.size(0), keep.size(1)}, grad_out.options()).index_add_(0, rows, masked);
}

}  // namespace pep_kernels
