#include "soft_threshold.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace pep_kernels {
namespace {

enum class RowSource { Shared, PerRow, PerField };

struct Layout {
  RowSource rows;
  bool per_dim;
};

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

template <typename index_t>
void check_ids(const index_t* ids, int64_t n, int64_t num_rows) {
  for (int64_t k = 0; k < n; ++k) {
    const int64_t id = ids[k];
    TORCH_CHECK_INDEX(id >= 0 && id < num_rows, "index ", id, " is out of range for a table of ", num_rows,
                      " rows (valid ids are 0..", num_rows - 1, ")");
  }
}

template <typename scalar_t>
inline scalar_t sigmoid(scalar_t x) {
  return scalar_t(1) / (scalar_t(1) + std::exp(-x));
}

// Where the threshold of lookup k of row `row` lives, as a row of the 2-D threshold.
inline int64_t threshold_row(Layout layout, int64_t row, int64_t k, int64_t num_fields) {
  switch (layout.rows) {
    case RowSource::PerRow: return row;
    case RowSource::PerField: return k % num_fields;
    default: return 0;
  }
}

// Grain: about 32K elements per task, so small batches stay on one thread.
int64_t grain(int64_t d) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1)); }

}  // namespace

at::Tensor cpu_forward(const at::Tensor& ids_in, const at::Tensor& weight, const at::Tensor& threshold,
                       std::string_view mode, double gk) {
  check_inputs(ids_in, weight, threshold);
  const Layout layout = parse_mode(mode);
  const at::Tensor ids = ids_in.contiguous();
  const int64_t n = ids.numel(), d = weight.size(1), num_rows = weight.size(0);
  const at::Tensor s = threshold_2d(threshold, weight, layout, n);
  at::Tensor out = at::empty({n, d}, weight.options());
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "pep_cpu_forward", [&] {
    AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "pep_cpu_forward_ids", [&] {
      const index_t* id_ptr = ids.data_ptr<index_t>();
      check_ids(id_ptr, n, num_rows);
      const scalar_t* w = weight.data_ptr<scalar_t>();
      const scalar_t* sp = s.data_ptr<scalar_t>();
      scalar_t* o = out.data_ptr<scalar_t>();
      const int64_t sw0 = weight.stride(0), sw1 = weight.stride(1), ss0 = s.stride(0), ss1 = s.stride(1);
      const int64_t num_fields = s.size(0);
      const scalar_t g = static_cast<scalar_t>(gk);
      at::parallel_for(0, n, grain(d), [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          const int64_t row = id_ptr[k];
          const scalar_t* wr = w + row * sw0;
          const scalar_t* sr = sp + threshold_row(layout, row, k, num_fields) * ss0;
          scalar_t* orow = o + k * d;
          const scalar_t row_t = layout.per_dim ? scalar_t(0) : g * sigmoid(sr[0]);
          for (int64_t j = 0; j < d; ++j) {
            const scalar_t v = wr[j * sw1];
            const scalar_t t = layout.per_dim ? g * sigmoid(sr[j * ss1]) : row_t;
            const scalar_t a = std::abs(v) - t;
            const scalar_t r = a <= 0 ? scalar_t(0) : a;  // NaN propagates, as torch.relu
            orow[j] = v < 0 ? -r : r;
          }
        }
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_backward(
    const at::Tensor& grad_out_in, const at::Tensor& ids_in, const at::Tensor& weight,
    const at::Tensor& threshold, std::string_view mode, double gk, bool sparse) {
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
  auto [sorted_ids, perm] = at::sort(ids.to(at::kLong), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  auto [seg_rows, inverse, counts] = at::unique_consecutive(sorted_ids, false, /*return_counts=*/true);
  const at::Tensor seg_start = at::constant_pad_nd(at::cumsum(counts, 0), {1, 0}, 0);
  const int64_t num_segments = seg_rows.numel();
  const int64_t num_dst = sparse ? num_segments : num_rows;

  at::Tensor grad_w = at::zeros({num_dst, d}, weight.options());
  const bool per_row = layout.rows == RowSource::PerRow;
  at::Tensor grad_s = per_row ? at::zeros({num_dst, s.size(1)}, weight.options()) : at::Tensor();
  at::Tensor contrib = per_row ? at::Tensor() : at::zeros({n, d}, weight.options());

  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "pep_cpu_backward", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* go = grad_out.data_ptr<scalar_t>();
    const int64_t* rows = seg_rows.data_ptr<int64_t>();
    const int64_t* order = perm.data_ptr<int64_t>();
    const int64_t* start = seg_start.data_ptr<int64_t>();
    scalar_t* gw = grad_w.data_ptr<scalar_t>();
    scalar_t* gs = per_row ? grad_s.data_ptr<scalar_t>() : nullptr;
    scalar_t* cb = per_row ? nullptr : contrib.data_ptr<scalar_t>();
    const int64_t sw0 = weight.stride(0), sw1 = weight.stride(1), ss0 = s.stride(0), ss1 = s.stride(1);
    const int64_t num_fields = s.size(0), s_cols = s.size(1);
    const scalar_t g = static_cast<scalar_t>(gk);
    const int64_t avg_len = std::max<int64_t>(1, n / std::max<int64_t>(num_segments, 1));
    at::parallel_for(0, num_segments, std::max<int64_t>(1, grain(d) / avg_len), [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t row = rows[u];
        const int64_t dst = sparse ? u : row;
        const scalar_t* wr = w + row * sw0;
        scalar_t* gwr = gw + dst * d;
        scalar_t* gsr = per_row ? gs + dst * s_cols : nullptr;
        for (int64_t p = start[u]; p < start[u + 1]; ++p) {
          const int64_t k = order[p];
          const scalar_t* sr = sp + threshold_row(layout, row, k, num_fields) * ss0;
          const scalar_t* gk_row = go + k * d;
          for (int64_t j = 0; j < d; ++j) {
            const scalar_t v = wr[j * sw1];
            const scalar_t y = sigmoid(sr[layout.per_dim ? j * ss1 : 0]);
            const bool keep = std::abs(v) - g * y > 0;
            const scalar_t gv = gk_row[j];
            gwr[j] += keep ? gv : scalar_t(0);
            const scalar_t g_sign = keep ? (v < 0 ? -gv : gv) : scalar_t(0);  // G * sign(W)
            if (per_row) {
              gsr[layout.per_dim ? j : 0] += g_sign;
            } else {
              cb[k * d + j] = g_sign;
            }
          }
        }
        if (per_row) {
          const scalar_t* sr = sp + row * ss0;
          for (int64_t c = 0; c < s_cols; ++c) {
            const scalar_t y = sigmoid(sr[c * ss1]);
            gsr[c] = -(gsr[c] * g) * (scalar_t(1) - y) * y;
          }
        }
      }
    });
  });

  if (!per_row) {
    // Shared thresholds: reduce the per-lookup terms, then the chain rule through gk * sigmoid.
    at::Tensor total;
    if (layout.rows == RowSource::PerField) {
      at::Tensor per_field = contrib.view({-1, s.size(0), d}).sum(0);
      total = layout.per_dim ? per_field : per_field.sum(1, /*keepdim=*/true);
    } else {
      total = layout.per_dim ? contrib.sum(0) : contrib.sum().reshape({1});
    }
    const at::Tensor y = at::sigmoid(s);
    grad_s = (-(total.view_as(s) * gk) * (1 - y) * y).view(threshold.sizes());
  } else if (!sparse) {
    grad_s = grad_s.view(threshold.sizes());
  }
  at::Tensor out_rows = sparse ? seg_rows : at::empty({0}, ids.options().dtype(at::kLong));
  return {grad_w, grad_s, out_rows};
}

}  // namespace pep_kernels
