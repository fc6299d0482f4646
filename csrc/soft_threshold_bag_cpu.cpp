#include "soft_threshold_bag.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <vector>

#include "cpu_features.h"
#include "optim.h"
#include "soft_threshold_bag_rows.h"
#include "soft_threshold_internal.h"

namespace pep_kernels {
namespace {

// The checked arguments of a bag op.
struct Bags {
  Layout layout;
  at::Tensor ids, bag_offsets, per_sample_weights, s;  // contiguous; per_sample_weights undefined when absent
  int64_t num_bags;
  bool mean;
  int64_t padding_idx;
};

Layout parse_bag_mode(std::string_view mode) {
  const Layout layout = parse_mode(mode);
  TORCH_CHECK_VALUE(layout.rows != RowSource::PerField, "threshold mode '", mode,
                    "' does not apply to a bag (a bag has no field axis); expected global, dimension, feature or "
                    "feature_dim");
  return layout;
}

// ValueError naming the first offset that is not where a bag can start.
void check_bag_offsets(const int64_t* offsets, int64_t count, int64_t n) {
  TORCH_CHECK_VALUE(offsets[0] == 0, "bag offsets must start at 0, got offsets[0] = ", offsets[0]);
  for (int64_t i = 1; i < count; ++i) {
    TORCH_CHECK_VALUE(offsets[i] <= n, "bag offsets must be at most the number of ids ", n, ", got offsets[", i,
                      "] = ", offsets[i]);
    TORCH_CHECK_VALUE(offsets[i] >= offsets[i - 1], "bag offsets must be non-decreasing, got offsets[", i, "] = ",
                      offsets[i], " after offsets[", i - 1, "] = ", offsets[i - 1]);
  }
  TORCH_CHECK_VALUE(offsets[count - 1] == n, "the last bag offset must be the number of ids ", n, ", got offsets[",
                    count - 1, "] = ", offsets[count - 1]);
}

Bags check_bags(const at::Tensor& ids_in, const at::Tensor& bag_offsets_in,
                const std::optional<at::Tensor>& per_sample_weights, const at::Tensor& weight,
                const at::Tensor& threshold, std::string_view mode, std::string_view pooling, int64_t padding_idx) {
  check_inputs(ids_in, weight, threshold);
  const Layout layout = parse_bag_mode(mode);
  TORCH_CHECK_VALUE(pooling == "sum" || pooling == "mean", "unknown pooling '", pooling, "'; expected sum or mean");
  const bool mean = pooling == "mean";
  const at::Tensor ids = ids_in.contiguous();
  const int64_t n = ids.numel(), num_rows = weight.size(0);
  TORCH_CHECK_TYPE(bag_offsets_in.scalar_type() == at::kLong, "bag offsets must be int64, got ",
                   bag_offsets_in.scalar_type());
  TORCH_CHECK_VALUE(bag_offsets_in.dim() == 1 && bag_offsets_in.numel() >= 1 && bag_offsets_in.device().is_cpu(),
                    "bag offsets must be a 1-D CPU tensor of B + 1 offsets, got shape ", bag_offsets_in.sizes());
  const at::Tensor bag_offsets = bag_offsets_in.contiguous();
  check_bag_offsets(bag_offsets.data_ptr<int64_t>(), bag_offsets.numel(), n);
  TORCH_CHECK_VALUE(padding_idx >= -1 && padding_idx < num_rows,
                    "padding_idx must be -1 (none) or a row of the table (0..", num_rows - 1, "), got ", padding_idx);
  at::Tensor weights;
  if (per_sample_weights.has_value()) {
    TORCH_CHECK_VALUE(!mean, "per_sample_weights need pooling 'sum', got 'mean'");
    TORCH_CHECK_TYPE(per_sample_weights->scalar_type() == weight.scalar_type(), "per_sample_weights dtype ",
                     per_sample_weights->scalar_type(), " must match weight dtype ", weight.scalar_type());
    TORCH_CHECK_VALUE(per_sample_weights->dim() == 1 && per_sample_weights->numel() == n &&
                          per_sample_weights->device().is_cpu(),
                      "per_sample_weights must be a 1-D CPU tensor of one weight per id (", n, "), got shape ",
                      per_sample_weights->sizes());
    weights = per_sample_weights->contiguous();
  }
  return {layout, ids, bag_offsets, weights, threshold_2d(threshold, weight, layout, n), bag_offsets.numel() - 1,
          mean, padding_idx};
}

template <typename T, typename I>
BagArgs<T, I> bag_args(const Bags& b, const at::Tensor& weight, double gk) {
  return {b.ids.data_ptr<I>(), b.bag_offsets.data_ptr<int64_t>(),
          b.per_sample_weights.defined() ? b.per_sample_weights.data_ptr<T>() : nullptr, weight.data_ptr<T>(),
          weight.stride(0), weight.stride(1), b.s.data_ptr<T>(), b.s.stride(0), b.s.stride(1), weight.size(1),
          b.layout, static_cast<T>(gk), b.mean, b.padding_idx};
}

// Elements a bag of average length makes: the parallel grain of a loop over bags.
int64_t bag_elements(const Bags& b, int64_t d) {
  return d * std::max<int64_t>(1, b.ids.numel() / std::max<int64_t>(b.num_bags, 1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bag_backward(
    const at::Tensor& grad_out_in, const at::Tensor& ids, const at::Tensor& bag_offsets,
    const std::optional<at::Tensor>& per_sample_weights, const at::Tensor& weight, const at::Tensor& threshold,
    std::string_view mode, double gk, std::string_view pooling, int64_t padding_idx, bool sparse,
    const FusedStep* fused) {
  const Bags b = check_bags(ids, bag_offsets, per_sample_weights, weight, threshold, mode, pooling, padding_idx);
  const at::Tensor& s = b.s;
  const int64_t n = b.ids.numel(), d = weight.size(1), num_rows = weight.size(0);
  TORCH_CHECK_VALUE(grad_out_in.dim() == 2 && grad_out_in.size(0) == b.num_bags && grad_out_in.size(1) == d,
                    "grad_out must have shape (", b.num_bags, ", ", d, ") (one row per bag), got ",
                    grad_out_in.sizes());
  const at::Tensor grad_out = grad_out_in.to(weight.scalar_type()).contiguous();
  AT_DISPATCH_INDEX_TYPES(b.ids.scalar_type(), "pep_bag_check_ids", [&] {
    check_ids(b.ids.data_ptr<index_t>(), n, num_rows);
  });

  // Each lookup's bag, and its factor where bags are weighted or averaged.
  const bool scaled = b.mean || b.per_sample_weights.defined();
  const at::Tensor lookup_bags = at::empty({n}, b.ids.options().dtype(at::kLong));
  const at::Tensor scale = scaled ? at::empty({n}, weight.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "pep_bag_scales", [&] {
    AT_DISPATCH_INDEX_TYPES(b.ids.scalar_type(), "pep_bag_scales_ids", [&] {
      const int64_t* offsets = b.bag_offsets.data_ptr<int64_t>();
      const index_t* id = b.ids.data_ptr<index_t>();
      const scalar_t* weights = b.per_sample_weights.defined() ? b.per_sample_weights.data_ptr<scalar_t>() : nullptr;
      int64_t* bag_of = lookup_bags.data_ptr<int64_t>();
      scalar_t* factor = scaled ? scale.data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, b.num_bags, grain(bag_elements(b, 1)), [&](int64_t begin, int64_t end) {
        for (int64_t bag = begin; bag < end; ++bag) {
          int64_t count = 0;
          for (int64_t k = offsets[bag]; k < offsets[bag + 1]; ++k) {
            bag_of[k] = bag;
            count += id[k] != b.padding_idx;
          }
          if (!scaled) continue;
          // As torch's embedding_bag backward: the gradient of a mean is grad_out * (1 / count).
          const scalar_t inverse = count > 0 ? scalar_t(1) / static_cast<scalar_t>(count) : scalar_t(0);
          for (int64_t k = offsets[bag]; k < offsets[bag + 1]; ++k) {
            factor[k] = weights != nullptr ? weights[k] : inverse;
          }
        }
      });
    });
  });

  // The lookups that reach a row (padding ones do not), grouped by row; each row's lookups are
  // accumulated by one task in a fixed order. Their bags and factors are gathered in that order
  // once, so that the kernel reads them in sequence (`order` the identity), not at random.
  at::Tensor keys = b.ids.to(at::kLong), positions;
  if (b.padding_idx >= 0) {
    positions = at::nonzero(keys != b.padding_idx).view(-1);
    keys = keys.index_select(0, positions);
  }
  auto [sorted_ids, order] = sort_ids(keys.contiguous(), num_rows);
  if (positions.defined()) order = positions.index_select(0, order);
  const at::Tensor sorted_bags = lookup_bags.index_select(0, order);
  const at::Tensor sorted_scale = scaled ? scale.index_select(0, order) : at::Tensor();
  const at::Tensor in_order = at::arange(order.numel(), order.options());
  auto [seg_rows, inverse, counts] = at::unique_consecutive(sorted_ids, false, /*return_counts=*/true);
  const at::Tensor seg_start = at::constant_pad_nd(at::cumsum(counts, 0), {1, 0}, 0);
  const int64_t num_segments = seg_rows.numel();
  const int64_t num_dst = sparse ? num_segments : num_rows;
  const bool per_row = b.layout.rows == RowSource::PerRow;
  const auto alloc = [&](int64_t cols) {
    if (fused != nullptr) return at::Tensor();
    return sparse ? at::empty({num_dst, cols}, weight.options()) : at::zeros({num_dst, cols}, weight.options());
  };
  at::Tensor grad_w = alloc(d);
  at::Tensor grad_s = per_row ? alloc(s.size(1)) : at::Tensor();
  // Shared thresholds: one term per lookup that reaches a row, in sorted order.
  at::Tensor contrib = per_row ? at::Tensor() : at::empty({order.numel(), d}, weight.options());
  at::Tensor grad_weights = at::empty({b.per_sample_weights.defined() && fused == nullptr ? n : 0}, weight.options());

  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "pep_bag_backward", [&] {
    OptimArgs<scalar_t> update_w{}, update_s{};
    if (fused != nullptr) {
      update_w = optim_args<scalar_t>(fused->weight_state, fused->schedule, fused->kind, fused->hparams, fused->step);
      if (per_row) {
        update_s = optim_args<scalar_t>(fused->threshold_state, fused->schedule, fused->kind, fused->hparams,
                                        fused->step);
      }
    }
    BackwardArgs<scalar_t> args{
        seg_rows.data_ptr<int64_t>(), seg_start.data_ptr<int64_t>(), in_order.data_ptr<int64_t>(),
        weight.data_ptr<scalar_t>(), weight.stride(0), weight.stride(1), s.data_ptr<scalar_t>(), s.stride(0),
        s.stride(1), s.size(0), grad_out.data_ptr<scalar_t>(), d, b.layout, static_cast<scalar_t>(gk), sparse,
        grad_w.defined() ? grad_w.data_ptr<scalar_t>() : nullptr,
        grad_s.defined() ? grad_s.data_ptr<scalar_t>() : nullptr,
        per_row ? nullptr : contrib.data_ptr<scalar_t>(),
        fused != nullptr ? &update_w : nullptr,
        fused != nullptr && per_row ? &update_s : nullptr};
    args.grad_rows = sorted_bags.data_ptr<int64_t>();
    args.grad_scale = scaled ? sorted_scale.data_ptr<scalar_t>() : nullptr;
    const bool avx2 = cpu_has_avx2();
    const int64_t per_segment = d * std::max<int64_t>(1, n / std::max<int64_t>(num_segments, 1));
    at::parallel_for(0, num_segments, grain(per_segment), [&](int64_t begin, int64_t end) {
      avx2 ? rows_avx2::backward(args, begin, end) : rows_base::backward(args, begin, end);
    });
    if (grad_weights.numel() > 0) {
      AT_DISPATCH_INDEX_TYPES(b.ids.scalar_type(), "pep_bag_weight_grad", [&] {
        const BagWeightGradArgs<scalar_t, index_t> w_args{bag_args<scalar_t, index_t>(b, weight, gk),
                                                         grad_out.data_ptr<scalar_t>(),
                                                         lookup_bags.data_ptr<int64_t>(),
                                                         grad_weights.data_ptr<scalar_t>()};
        at::parallel_for(0, n, grain(d), [&](int64_t begin, int64_t end) {
          avx2 ? rows_avx2::bag_weight_grad(w_args, begin, end) : rows_base::bag_weight_grad(w_args, begin, end);
        });
      });
    }
  });

  if (!per_row) {
    grad_s = shared_threshold_grad(contrib, s, b.layout, gk, threshold.sizes());
  } else if (!sparse && grad_s.defined()) {
    grad_s = grad_s.view(threshold.sizes());
  }
  at::Tensor rows = sparse ? seg_rows : at::empty({0}, b.ids.options().dtype(at::kLong));
  return {grad_w, grad_s, rows, grad_weights};
}

}  // namespace

at::Tensor soft_threshold_bag_forward(const at::Tensor& ids, const at::Tensor& bag_offsets,
                                      const std::optional<at::Tensor>& per_sample_weights, const at::Tensor& weight,
                                      const at::Tensor& threshold, std::string_view mode, double gk,
                                      std::string_view pooling, int64_t padding_idx,
                                      const std::optional<at::Tensor>& /*id_errors*/) {
  const Bags b = check_bags(ids, bag_offsets, per_sample_weights, weight, threshold, mode, pooling, padding_idx);
  const int64_t n = b.ids.numel(), d = weight.size(1);
  at::Tensor out = at::empty({b.num_bags, d}, weight.options());  // every bag's row is written
  if (b.num_bags == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "pep_bag_forward", [&] {
    AT_DISPATCH_INDEX_TYPES(b.ids.scalar_type(), "pep_bag_forward_ids", [&] {
      check_ids(b.ids.data_ptr<index_t>(), n, weight.size(0));
      const BagForwardArgs<scalar_t, index_t> args{bag_args<scalar_t, index_t>(b, weight, gk),
                                                   out.data_ptr<scalar_t>()};
      const bool avx2 = cpu_has_avx2();
      at::parallel_for(0, b.num_bags, grain(bag_elements(b, d)), [&](int64_t begin, int64_t end) {
        avx2 ? rows_avx2::bag_forward(args, begin, end) : rows_base::bag_forward(args, begin, end);
      });
    });
  });
  return out;
}

at::Tensor soft_threshold_bag_train_forward(const at::Tensor& ids, const at::Tensor& bag_offsets,
                                            const std::optional<at::Tensor>& per_sample_weights,
                                            at::TensorList weight_state, at::TensorList threshold_state,
                                            const at::Tensor& schedule, const at::Tensor& step, std::string_view mode,
                                            double gk, std::string_view pooling, int64_t padding_idx,
                                            std::string_view kind, at::ArrayRef<double> hparams,
                                            const std::optional<at::Tensor>& id_errors) {
  const int64_t steps = steps_taken(weight_state, threshold_state, step);
  const at::Tensor& weight = weight_state[0];
  const at::Tensor& threshold = threshold_state[0];
  // Checked before any row moves: the catch-up reads the rows the ids name.
  const Bags b = check_bags(ids, bag_offsets, per_sample_weights, weight, threshold, mode, pooling, padding_idx);
  AT_DISPATCH_INDEX_TYPES(b.ids.scalar_type(), "pep_bag_train_forward_ids", [&] {
    check_ids(b.ids.data_ptr<index_t>(), b.ids.numel(), weight.size(0));
  });
  catch_up_rows(weight_state, threshold_state, b.ids, schedule, parse_optim(kind), hparams, steps);
  return soft_threshold_bag_forward(ids, bag_offsets, per_sample_weights, weight, threshold, mode, gk, pooling,
                                    padding_idx, id_errors);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_threshold_bag_backward(
    const at::Tensor& grad_out, const at::Tensor& ids, const at::Tensor& bag_offsets,
    const std::optional<at::Tensor>& per_sample_weights, const at::Tensor& weight, const at::Tensor& threshold,
    std::string_view mode, double gk, std::string_view pooling, int64_t padding_idx, bool sparse) {
  return bag_backward(grad_out, ids, bag_offsets, per_sample_weights, weight, threshold, mode, gk, pooling,
                      padding_idx, sparse, nullptr);
}

at::Tensor soft_threshold_bag_backward_step(const at::Tensor& grad_out, const at::Tensor& ids,
                                            const at::Tensor& bag_offsets,
                                            const std::optional<at::Tensor>& per_sample_weights,
                                            at::TensorList weight_state, at::TensorList threshold_state,
                                            const at::Tensor& schedule, const at::Tensor& step, std::string_view mode,
                                            double gk, std::string_view pooling, int64_t padding_idx,
                                            std::string_view kind, at::ArrayRef<double> hparams,
                                            const std::optional<at::Tensor>& /*id_errors*/) {
  const FusedStep fused{weight_state, threshold_state, schedule, parse_optim(kind), hparams,
                        steps_taken(weight_state, threshold_state, step) + 1};
  const bool per_row = parse_bag_mode(mode).rows == RowSource::PerRow;
  const at::Tensor& weight = weight_state[0];
  const at::Tensor& threshold = threshold_state[0];
  at::Tensor grad_s;
  if (fused.kind == RowOptim::AdamDense) {
    auto [grad_w, grad_rows_s, rows, unused] = bag_backward(grad_out, ids, bag_offsets, per_sample_weights, weight,
                                                           threshold, mode, gk, pooling, padding_idx, true, nullptr);
    dense_step(fused, per_row, rows, grad_w, grad_rows_s);
    grad_s = grad_rows_s;
  } else {
    grad_s = std::get<1>(bag_backward(grad_out, ids, bag_offsets, per_sample_weights, weight, threshold, mode, gk,
                                      pooling, padding_idx, true, &fused));
  }
  step.fill_(fused.step);
  return per_row ? at::empty({0}, threshold.options()) : grad_s;
}

}  // namespace pep_kernels
