// CPU loss family against independent double computations: the reference forward (float and double) against a
// naive materialized-logits loss, the backward against central finite differences, the chunk steps composed
// into the same loss, and the argument checks.
#include <gtest/gtest.h>

#include "views.h"

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "kindred/loss.h"

namespace kindred {
namespace {

using testing::view;

struct Problem {
  int64_t n = 7, d = 5, v = 613;  // v not a multiple of the reference's 512-column tiles
  std::vector<double> h, w, b;
  std::vector<int32_t> y;
  explicit Problem(uint32_t seed) {
    std::mt19937 gen(seed);
    std::normal_distribution<double> nd(0.0, 1.0);
    h.resize(n * d), w.resize(v * d), b.resize(v);
    for (auto& x : h) x = nd(gen);
    for (auto& x : w) x = 0.5 * nd(gen);
    for (auto& x : b) x = 0.3 * nd(gen);
    y.resize(n);
    for (int64_t i = 0; i < n; ++i) y[i] = static_cast<int32_t>(gen() % v);
    y[2] = -100;
  }
};

// Per-token loss from materialized logits, in double.
std::vector<double> naive_loss(const Problem& p, const LceOptions& o) {
  std::vector<double> out(p.n, 0.0);
  for (int64_t i = 0; i < p.n; ++i) {
    if (p.y[i] == o.ignore_index) continue;
    std::vector<double> z(p.v);
    double m = -INFINITY, sumz = 0;
    for (int64_t v = 0; v < p.v; ++v) {
      double r = p.b[v];
      for (int64_t k = 0; k < p.d; ++k) r += p.h[i * p.d + k] * p.w[v * p.d + k];
      z[v] = o.softcap > 0 ? o.softcap * std::tanh(r / o.softcap) : r;
      m = std::max(m, z[v]);
      sumz += z[v];
    }
    double s = 0;
    for (double x : z) s += std::exp(x - m);
    const double lse = m + std::log(s), eps = o.label_smoothing;
    out[i] = lse - (1 - eps) * z[p.y[i]] - eps / p.v * sumz + o.z_loss * lse * lse;
  }
  return out;
}

LceOptions all_options() {
  LceOptions o;
  o.label_smoothing = 0.1;
  o.z_loss = 0.01;
  o.softcap = 3.0;
  return o;
}

TEST(LinearCrossEntropy, ForwardMatchesMaterializedLogitsInDoubleAndFloat) {
  Problem p(1);
  const LceOptions o = all_options();
  const auto want = naive_loss(p, o);
  std::vector<double> loss(p.n, NAN), lse(p.n, NAN);
  std::vector<uint8_t> hit(p.n, 7);
  linear_cross_entropy(view(p.h, DType::f64, {p.n, p.d}), view(p.w, DType::f64, {p.v, p.d}),
                       view(p.b, DType::f64, {p.v}), view(p.y, DType::i32, {p.n}), o, view(loss, DType::f64, {p.n}),
                       view(lse, DType::f64, {p.n}), view(hit, DType::u8, {p.n}));
  for (int64_t i = 0; i < p.n; ++i) {
    EXPECT_NEAR(loss[i], want[i], 1e-12 * (1 + std::fabs(want[i]))) << i;
    EXPECT_LE(hit[i], 1);
  }
  EXPECT_EQ(loss[2], 0.0);
  EXPECT_EQ(hit[2], 0);
  std::vector<float> hf(p.h.begin(), p.h.end()), wf(p.w.begin(), p.w.end()), bf(p.b.begin(), p.b.end());
  std::vector<float> lossf(p.n, NAN), lsef(p.n, NAN);
  linear_cross_entropy(view(hf, DType::f32, {p.n, p.d}), view(wf, DType::f32, {p.v, p.d}), view(bf, DType::f32, {p.v}),
                       view(p.y, DType::i32, {p.n}), o, view(lossf, DType::f32, {p.n}), view(lsef, DType::f32, {p.n}),
                       view(hit, DType::u8, {p.n}));
  for (int64_t i = 0; i < p.n; ++i) EXPECT_NEAR(lossf[i], want[i], 2e-5 * (1 + std::fabs(want[i]))) << i;
}

TEST(LinearCrossEntropy, BackwardMatchesFiniteDifferences) {
  Problem p(2);
  const LceOptions o = all_options();
  std::vector<double> coef(p.n);
  for (int64_t i = 0; i < p.n; ++i) coef[i] = 0.5 + 0.1 * static_cast<double>(i);
  auto total = [&](const Problem& q) {
    const auto l = naive_loss(q, o);
    double t = 0;
    for (int64_t i = 0; i < q.n; ++i) t += coef[i] * l[i];
    return t;
  };
  std::vector<double> loss(p.n), lse(p.n), dh(p.n * p.d, NAN), dw(p.v * p.d, NAN), db(p.v, NAN);
  std::vector<uint8_t> hit(p.n);
  auto H = view(p.h, DType::f64, {p.n, p.d});
  auto W = view(p.w, DType::f64, {p.v, p.d});
  auto B = view(p.b, DType::f64, {p.v});
  auto Y = view(p.y, DType::i32, {p.n});
  linear_cross_entropy(H, W, B, Y, o, view(loss, DType::f64, {p.n}), view(lse, DType::f64, {p.n}),
                       view(hit, DType::u8, {p.n}));
  linear_cross_entropy_backward(H, W, B, Y, view(lse, DType::f64, {p.n}), view(coef, DType::f64, {p.n}), o,
                                view(dh, DType::f64, {p.n, p.d}), view(dw, DType::f64, {p.v, p.d}),
                                view(db, DType::f64, {p.v}));
  const double step = 1e-6;
  auto fd = [&](std::vector<double> Problem::*field, int64_t idx) {
    Problem a = p, b = p;
    (a.*field)[idx] += step;
    (b.*field)[idx] -= step;
    return (total(a) - total(b)) / (2 * step);
  };
  for (int64_t idx : {0, 3, 11, 34}) EXPECT_NEAR(dh[idx], fd(&Problem::h, idx), 1e-6) << "dh " << idx;
  for (int64_t idx : {0, 17, 600 * 5 + 4}) EXPECT_NEAR(dw[idx], fd(&Problem::w, idx), 1e-6) << "dw " << idx;
  for (int64_t idx : {0, 100, 612}) EXPECT_NEAR(db[idx], fd(&Problem::b, idx), 1e-6) << "db " << idx;
  for (int64_t k = 0; k < p.d; ++k) EXPECT_EQ(dh[2 * p.d + k], 0.0);  // the ignored token
}

TEST(LinearCrossEntropy, ChunkStepsComposeToTheLoss) {
  Problem p(3);
  LceOptions o;
  o.z_loss = 0.01;
  o.label_smoothing = 0.2;
  const auto want = naive_loss(p, o);
  std::vector<float> state(p.n * kLceStateCols), loss(p.n, NAN), lse(p.n, NAN);
  for (int64_t i = 0; i < p.n; ++i) {
    float* s = &state[i * kLceStateCols];
    s[kLceMax] = s[kLceRef] = s[kLceRMax] = -INFINITY;
    s[kLceSum] = s[kLceSumZ] = 0.0f;
    s[kLceZy] = NAN;
  }
  std::vector<int32_t> arg(p.n, 0);
  std::vector<uint8_t> hit(p.n, 9);
  std::vector<float> acc(p.n * p.d, 0.0f), dh(p.n * p.d, NAN), wf(p.w.begin(), p.w.end()), wsum(p.d, 0.0f);
  std::vector<float> scale{1.0f};
  for (int64_t v = 0; v < p.v; ++v)
    for (int64_t k = 0; k < p.d; ++k) wsum[k] += wf[v * p.d + k];
  const int64_t c = 100;  // 7 chunks, the last one of 13 columns
  for (int64_t c0 = 0; c0 < p.v; c0 += c) {
    const int64_t cols = std::min(c, p.v - c0);
    std::vector<float> logits(p.n * cols), bias(p.b.begin() + c0, p.b.begin() + c0 + cols);
    for (int64_t i = 0; i < p.n; ++i)
      for (int64_t v = 0; v < cols; ++v) {
        double r = 0;
        for (int64_t k = 0; k < p.d; ++k) r += p.h[i * p.d + k] * p.w[(c0 + v) * p.d + k];
        logits[i * cols + v] = static_cast<float>(r);
      }
    auto L = view(logits, DType::f32, {p.n, cols});
    lce_chunk_update(L, view(bias, DType::f32, {cols}), view(p.y, DType::i32, {p.n}), c0, p.v, o,
                     view(state, DType::f32, {p.n, kLceStateCols}), view(arg, DType::i32, {p.n}), L,
                     view(acc, DType::f32, {p.n, p.d}), 0);
    // acc += E · W_chunk (the GEMM the Python side issues).
    for (int64_t i = 0; i < p.n; ++i)
      for (int64_t v = 0; v < cols; ++v)
        for (int64_t k = 0; k < p.d; ++k) acc[i * p.d + k] += logits[i * cols + v] * wf[(c0 + v) * p.d + k];
  }
  lce_finalize(view(state, DType::f32, {p.n, kLceStateCols}), view(arg, DType::i32, {p.n}),
               view(p.y, DType::i32, {p.n}), p.v, o, view(loss, DType::f32, {p.n}), view(lse, DType::f32, {p.n}),
               view(hit, DType::u8, {p.n}), view(acc, DType::f32, {p.n, p.d}), view(wf, DType::f32, {p.v, p.d}),
               view(wsum, DType::f32, {p.d}), view(scale, DType::f32, {1}), view(dh, DType::f32, {p.n, p.d}), 0);
  for (int64_t i = 0; i < p.n; ++i) {
    EXPECT_NEAR(loss[i], want[i], 2e-5 * (1 + std::fabs(want[i]))) << i;
    EXPECT_LE(hit[i], 1);
    for (int64_t k = 0; k < p.d; ++k) {
      EXPECT_TRUE(std::isfinite(dh[i * p.d + k]));
      EXPECT_EQ(acc[i * p.d + k], 0.0f);
    }
  }
  // dH of token 0 (coef 1) against finite differences of its loss.
  const double step = 1e-6;
  for (int64_t k = 0; k < p.d; ++k) {
    Problem a = p, b = p;
    a.h[k] += step, b.h[k] -= step;
    EXPECT_NEAR(dh[k], (naive_loss(a, o)[0] - naive_loss(b, o)[0]) / (2 * step), 2e-4) << k;
  }
}

TEST(LinearCrossEntropy, ChecksNameTheArgument) {
  Problem p(4);
  std::vector<double> loss(p.n), lse(p.n);
  std::vector<uint8_t> hit(p.n);
  std::vector<float> wf(p.w.begin(), p.w.end());
  auto H = view(p.h, DType::f64, {p.n, p.d});
  auto W = view(p.w, DType::f64, {p.v, p.d});
  auto Y = view(p.y, DType::i32, {p.n});
  auto out = [&] { return std::make_tuple(view(loss, DType::f64, {p.n}), view(lse, DType::f64, {p.n})); };
  auto expect_error = [](auto&& fn, const char* needle) {
    try {
      fn();
      ADD_FAILURE() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_TRUE(e.input());
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  auto [L, S] = out();
  const auto Hit = view(hit, DType::u8, {p.n});
  expect_error(
      [&] {
        linear_cross_entropy(H, view(wf, DType::f32, {p.v, p.d}), {}, Y, {}, L, S, Hit);
      },
      "weight must have hidden's dtype");
  expect_error(
      [&] {
        linear_cross_entropy(H, view(p.w, DType::f64, {p.d, p.v}), {}, Y, {}, L, S, Hit);
      },
      "weight must have shape");
  p.y[4] = static_cast<int32_t>(p.v);
  expect_error([&] { linear_cross_entropy(H, W, {}, Y, {}, L, S, Hit); }, "targets[4] = 613 is outside");
  p.y[4] = 0;
  LceOptions bad;
  bad.softcap = -1.0;
  expect_error([&] { linear_cross_entropy(H, W, {}, Y, bad, L, S, Hit); }, "softcap must be");
  expect_error(
      [&] {
        linear_cross_entropy_backward(H, W, {}, Y, S, L, {}, std::nullopt, std::nullopt, view(lse, DType::f64, {p.n}));
      },
      "d_bias needs a bias");
}

}  // namespace
}  // namespace kindred
