// C++ consumers' view of the CPU kernels: direct calls and the dispatcher agree with a scalar
// transcription of PEP_SPEC sections 1-2, and bad ids throw c10::IndexError.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <string>

#include "soft_threshold.h"

namespace {

int checks = 0, failures = 0;

void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    std::printf("FAILED: %s\n", what.c_str());
    ++failures;
  }
}

void expect_close(const at::Tensor& a, const at::Tensor& b, const std::string& what) {
  expect(a.sizes() == b.sizes() && at::allclose(a, b, 1e-5, 1e-6), what);
}

// feature_dim mode, straight from the spec, one entry at a time.
void spec_feature_dim(const at::Tensor& ids, const at::Tensor& w, const at::Tensor& s, const at::Tensor& g,
                      double gk, at::Tensor& out, at::Tensor& gw, at::Tensor& gs) {
  const int64_t d = w.size(1);
  for (int64_t n = 0; n < ids.numel(); ++n) {
    const int64_t i = ids[n].item<int64_t>();
    for (int64_t j = 0; j < d; ++j) {
      const double v = w[i][j].item<double>();
      const double y = 1.0 / (1.0 + std::exp(-s[i][j].item<double>()));
      const double a = std::abs(v) - gk * y;
      const double keep = a > 0 ? 1.0 : 0.0;
      const double sign = (v > 0) - (v < 0);
      out[n][j] = sign * a * keep;
      const double gv = g[n][j].item<double>();
      gw[i][j] += gv * keep;
      gs[i][j] += -gk * y * (1 - y) * gv * sign * keep;
    }
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  const int64_t rows = 7, d = 5;
  const at::Tensor w = at::randn({rows, d}, at::kFloat);
  const at::Tensor s = at::rand({rows, d}, at::kFloat) * 2 - 1.5;
  const at::Tensor ids = at::tensor({3, 0, 3, 6, 3, 1}, at::kLong);
  const at::Tensor g = at::randn({ids.numel(), d}, at::kFloat);
  const double gk = 0.9;

  at::Tensor out = at::zeros({ids.numel(), d}, at::kDouble);
  at::Tensor gw = at::zeros({rows, d}, at::kDouble);
  at::Tensor gs = at::zeros({rows, d}, at::kDouble);
  spec_feature_dim(ids, w, s, g, gk, out, gw, gs);

  auto [kout, looked_up] = pep_kernels::soft_threshold_forward(ids, w, s, "feature_dim", gk, std::nullopt, std::nullopt);
  expect_close(kout.to(at::kDouble), out, "forward");
  expect(at::equal(looked_up.to(at::kLong), ids), "the forward returns the rows it read");
  auto [kw, ks, krows] = pep_kernels::soft_threshold_backward(g, looked_up, w, s, "feature_dim", gk, false);
  expect_close(kw.to(at::kDouble), gw, "grad weight");
  expect_close(ks.to(at::kDouble), gs, "grad threshold");
  expect(krows.numel() == 0, "dense backward returns no rows");

  auto [sw, ss, srows] = pep_kernels::soft_threshold_backward(g, looked_up, w, s, "feature_dim", gk, true);
  expect(at::equal(srows, at::tensor({0, 1, 3, 6}, at::kLong)), "sparse rows are the sorted distinct ids");
  expect_close(sw.to(at::kDouble), gw.index_select(0, srows), "sparse grad weight");
  expect_close(ss.to(at::kDouble), gs.index_select(0, srows), "sparse grad threshold");

  using Optional = const std::optional<at::Tensor>&;
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("pep_kernels::soft_threshold_forward", "")
                .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                          c10::string_view, double, Optional, Optional)>();
  expect_close(std::get<0>(op.call(ids, w, s, "feature_dim", gk, std::nullopt, std::nullopt)).to(at::kDouble), out,
               "forward through the dispatcher");

  bool raised = false;
  try {
    pep_kernels::soft_threshold_forward(at::tensor({0, 7}, at::kLong), w, s, "feature_dim", gk, std::nullopt,
                                        std::nullopt);
  } catch (const c10::IndexError& e) {
    raised = std::string(e.what()).find("index 7 is out of range") != std::string::npos;
  }
  expect(raised, "out-of-range id throws c10::IndexError naming it");

  std::printf("%d passed, %d failed\n", checks - failures, failures);
  return failures ? 1 : 0;
}
