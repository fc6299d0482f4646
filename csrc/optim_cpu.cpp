#include "optim.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <vector>

#include "cpu_features.h"

namespace pep_kernels {

RowOptim parse_optim(std::string_view kind) {
  if (kind == "sgd") return RowOptim::SGD;
  if (kind == "adagrad") return RowOptim::Adagrad;
  if (kind == "rowwise_adagrad") return RowOptim::RowwiseAdagrad;
  if (kind == "adam") return RowOptim::Adam;
  if (kind == "adam_dense") return RowOptim::AdamDense;
  TORCH_CHECK_VALUE(false, "unknown row optimizer '", kind,
                    "'; expected sgd, adagrad, rowwise_adagrad, adam or adam_dense");
}

namespace {

void check_state(const at::Tensor& t, const at::Tensor& param, at::IntArrayRef shape, at::ScalarType dtype,
                 const char* name) {
  TORCH_CHECK_VALUE(t.defined() && t.sizes() == shape, "optimizer state ", name, " must have shape ", shape,
                    ", got ", t.defined() ? t.sizes() : at::IntArrayRef{});
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "optimizer state ", name, " must be ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous() && t.device() == param.device(), "optimizer state ", name,
                    " must be contiguous and on the parameter's device");
}

}  // namespace

template <typename T>
OptimArgs<T> optim_args(at::TensorList state, const at::Tensor& schedule, RowOptim kind,
                        at::ArrayRef<double> hparams, int64_t step) {
  TORCH_CHECK_VALUE(state.size() == 4, "optimizer state must be [param, state1, state2, last_step], got ",
                    state.size(), " tensors");
  TORCH_CHECK_VALUE(hparams.size() == 5, "hparams must be [lr, eps, weight_decay, beta1, beta2], got ",
                    hparams.size(), " values");
  TORCH_CHECK_VALUE(step >= 1, "the optimizer step counts from 1, got ", step);
  for (int k = 0; k < 3; ++k) {
    TORCH_CHECK_VALUE(std::isfinite(hparams[k]) && hparams[k] >= 0, "lr, eps and weight_decay must be finite and >= 0, got ",
                      hparams[k]);
  }
  TORCH_CHECK_VALUE(hparams[3] >= 0 && hparams[3] < 1 && hparams[4] >= 0 && hparams[4] < 1,
                    "betas must be in [0, 1), got ", hparams[3], " and ", hparams[4]);
  const at::Tensor& param = state[0];
  TORCH_CHECK_VALUE(param.dim() == 2 && param.is_contiguous() && param.device().is_cpu(),
                    "a row optimizer needs a contiguous 2-D CPU parameter, got shape ", param.sizes());
  const int64_t rows = param.size(0), cols = param.size(1);
  const auto dtype = param.scalar_type();
  OptimArgs<T> o{kind, param.data_ptr<T>(), cols, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                 static_cast<T>(hparams[0]), static_cast<T>(hparams[1]), static_cast<T>(hparams[2]),
                 static_cast<T>(hparams[4]), static_cast<T>(1 - hparams[3]), static_cast<T>(1 - hparams[4]), step,
                 {}};
  if (kind == RowOptim::Adagrad) {
    check_state(state[1], param, {rows, cols}, dtype, "sum");
    o.state1 = state[1].data_ptr<T>();
  } else if (kind == RowOptim::RowwiseAdagrad) {
    check_state(state[1], param, {rows}, dtype, "sum");
    o.state1 = state[1].data_ptr<T>();
  } else if (kind == RowOptim::Adam || kind == RowOptim::AdamDense) {
    check_state(state[1], param, {rows, cols}, dtype, "exp_avg");
    check_state(state[2], param, {rows, cols}, dtype, "exp_avg_sq");
    o.state1 = state[1].data_ptr<T>();
    o.state2 = state[2].data_ptr<T>();
    if (kind == RowOptim::Adam) {
      check_state(state[3], param, {rows}, at::kLong, "last_step");
      o.last_step = state[3].data_ptr<int64_t>();
    }
    TORCH_CHECK_VALUE(schedule.dim() == 2 && schedule.size(0) == 4 && schedule.size(1) > step &&
                          schedule.scalar_type() == dtype && schedule.is_contiguous(),
                      "Adam needs a contiguous ", dtype, " schedule of shape (4, > ", step, ") (Adam.schedule), got ",
                      schedule.sizes());
    o.step_size = schedule.data_ptr<T>();
    o.bc2_sqrt = o.step_size + schedule.size(1);
    o.rate_sum_hi = o.bc2_sqrt + schedule.size(1);
    o.rate_sum_lo = o.rate_sum_hi + schedule.size(1);
    // Powers by repeated multiplication in double: 256 roundings of 1e-16 each.
    double beta1_l = 1, momentum_sum = 0, momentum_moment = 0;
    std::array<double, kSegmentSteps + 1> beta2_l{1};
    for (int64_t length = 1; length <= kSegmentSteps; ++length) {
      beta1_l *= hparams[3];
      momentum_sum += beta1_l;
      momentum_moment += length * beta1_l;
      beta2_l[length] = beta2_l[length - 1] * hparams[4];
      const int64_t centroid = momentum_sum > 0 ? std::lround(momentum_moment / momentum_sum) : 1;
      const double beta2_c = beta2_l[centroid], beta2_mid = beta2_l[(length + 1) / 2];
      o.segment_powers[length] = {static_cast<T>(beta1_l), static_cast<T>(momentum_sum), centroid,
                                  static_cast<T>(beta2_c), static_cast<T>(1 - beta2_c),
                                  static_cast<T>(beta2_mid), static_cast<T>(1 - beta2_mid),
                                  static_cast<T>(beta2_l[length]), static_cast<T>(1 - beta2_l[length])};
    }
  }
  return o;
}

template OptimArgs<float> optim_args<float>(at::TensorList, const at::Tensor&, RowOptim, at::ArrayRef<double>, int64_t);
template OptimArgs<double> optim_args<double>(at::TensorList, const at::Tensor&, RowOptim, at::ArrayRef<double>, int64_t);

void row_optimizer_step(at::TensorList state, const at::Tensor& rows_in, const at::Tensor& grads_in,
                        const at::Tensor& schedule, std::string_view kind_name, at::ArrayRef<double> hparams,
                        int64_t step) {
  const RowOptim kind = parse_optim(kind_name);
  TORCH_CHECK_VALUE(!state.empty(), "optimizer state must not be empty");
  const at::Tensor& param = state[0];
  TORCH_CHECK_TYPE(param.scalar_type() == at::kFloat || param.scalar_type() == at::kDouble,
                   "row optimizers take float32 or float64 parameters, got ", param.scalar_type());
  TORCH_CHECK_TYPE(rows_in.scalar_type() == at::kLong, "rows must be int64, got ", rows_in.scalar_type());
  const at::Tensor rows = rows_in.contiguous();
  const int64_t n = rows.numel();
  TORCH_CHECK_VALUE(rows.dim() == 1 && grads_in.dim() == 2 && grads_in.size(0) == n &&
                        grads_in.size(1) == param.size(1),
                    "grads must have shape (", n, ", ", param.size(1), ") for ", n, " rows, got ", grads_in.sizes());
  const at::Tensor grads = grads_in.to(param.scalar_type()).contiguous();
  if (n > 0) {
    const auto [lo, hi] = at::aminmax(rows);
    TORCH_CHECK_INDEX(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < param.size(0), "row ",
                      lo.item<int64_t>() < 0 ? lo.item<int64_t>() : hi.item<int64_t>(),
                      " is out of range for a parameter of ", param.size(0), " rows");
    // Sorted and distinct (as coalesced gradients are): two updates of one row would race.
    TORCH_CHECK_VALUE(n == 1 || at::all(rows.slice(0, 1).gt(rows.slice(0, 0, n - 1))).item<bool>(),
                      "rows must be sorted and distinct (coalesce the gradient first)");
  }
  const bool avx2 = cpu_has_avx2();
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "pep_row_optimizer_step", [&] {
    const OptimArgs<scalar_t> o = optim_args<scalar_t>(state, schedule, kind, hparams, step);
    const int64_t* r = rows.data_ptr<int64_t>();
    const scalar_t* g = grads.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(o.cols, 1));
    if (kind == RowOptim::AdamDense) {
      at::parallel_for(0, param.size(0), grain, [&](int64_t begin, int64_t end) {
        avx2 ? rows_avx2::dense_adam(o, r, g, n, begin, end) : rows_base::dense_adam(o, r, g, n, begin, end);
      });
    } else {
      at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
        avx2 ? rows_avx2::apply_rows(o, r, g, begin, end) : rows_base::apply_rows(o, r, g, begin, end);
      });
    }
  });
}

void row_optimizer_catch_up(at::TensorList state, const std::optional<at::Tensor>& rows_in,
                            const at::Tensor& schedule, at::ArrayRef<double> hparams, int64_t to_step) {
  TORCH_CHECK_VALUE(!state.empty() && state.size() % 4 == 0,
                    "optimizer state must be [param, state1, state2, last_step] for each parameter, got ",
                    state.size(), " tensors");
  const at::Tensor& param = state[0];
  TORCH_CHECK_TYPE(param.scalar_type() == at::kFloat || param.scalar_type() == at::kDouble,
                   "row optimizers take float32 or float64 parameters, got ", param.scalar_type());
  for (size_t k = 4; k < state.size(); k += 4) {
    TORCH_CHECK_VALUE(state[k].dim() == 2 && state[k].size(0) == param.size(0) &&
                          state[k].scalar_type() == param.scalar_type(),
                      "the parameters caught up together must have the same rows and dtype: ", param.sizes(), " ",
                      param.scalar_type(), " and ", state[k].sizes(), " ", state[k].scalar_type());
  }
  if (to_step < 1) return;  // nothing has been applied yet
  at::Tensor rows;
  if (rows_in.has_value()) {
    TORCH_CHECK_TYPE(rows_in->scalar_type() == at::kLong, "rows must be int64, got ", rows_in->scalar_type());
    rows = rows_in->contiguous();
    if (rows.numel() > 0) {
      const auto [lo, hi] = at::aminmax(rows);
      TORCH_CHECK_INDEX(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < param.size(0), "row ",
                        lo.item<int64_t>() < 0 ? lo.item<int64_t>() : hi.item<int64_t>(),
                        " is out of range for a parameter of ", param.size(0), " rows");
    }
  }
  const int64_t n = rows.defined() ? rows.numel() : param.size(0);
  const bool avx2 = cpu_has_avx2();
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "pep_row_optimizer_catch_up", [&] {
    std::vector<OptimArgs<scalar_t>> params;
    for (size_t k = 0; k < state.size(); k += 4) {
      params.push_back(optim_args<scalar_t>(state.slice(k, 4), schedule, RowOptim::Adam, hparams, to_step));
    }
    const int64_t count = static_cast<int64_t>(params.size());
    const int64_t* r = rows.defined() ? rows.data_ptr<int64_t>() : nullptr;
    const auto catch_up = [&](int64_t begin, int64_t end, int64_t part, int64_t parts) {
      avx2 ? rows_avx2::catch_up(params.data(), count, r, begin, end, part, parts, to_step)
           : rows_base::catch_up(params.data(), count, r, begin, end, part, parts, to_step);
    };
    if (r == nullptr) {  // every row once: split the rows
      at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) { catch_up(begin, end, 0, 1); });
    } else {  // ids, with duplicates: every task reads all ids and catches up the rows it owns
      const int64_t parts = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(n / 256, 1));
      at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
        for (int64_t part = begin; part < end; ++part) catch_up(0, n, part, parts);
      });
    }
  });
}

}  // namespace pep_kernels
