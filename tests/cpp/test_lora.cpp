// CPU lora reference against independent loops in long double, a finite-difference check of its backward,
// the dropout mask's statistics and reproducibility, and every argument check.
#include <gtest/gtest.h>

#include "views.h"

#include <Eigen/Core>
#include <cmath>
#include <random>
#include <vector>

#include "kindred/lora.h"

namespace kindred {
namespace {

using testing::view;

std::vector<double> randn(int64_t n, uint32_t seed, double scale = 1.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> d(0.0, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = d(gen) + 1e-3;  // non-zero
  return v;
}

// One problem: x [M, K], w [N, K], a [r, K], b [N, r], bias [N], seed words.
struct Problem {
  int64_t m, k, n, r;
  double s, p;
  std::vector<double> x, w, a, b, bias;
  std::vector<int32_t> seed{123456789, -42};
  Problem(int64_t m_, int64_t k_, int64_t n_, int64_t r_, double s_, double p_)
      : m(m_), k(k_), n(n_), r(r_), s(s_), p(p_) {
    x = randn(m * k, 1);
    w = randn(n * k, 2, 0.1);
    a = randn(r * k, 3, 0.1);
    b = randn(n * r, 4, 0.1);
    bias = randn(n, 5);
  }
  LoraDropout dropout() { return LoraDropout{p, view(seed, DType::i32, {2})}; }
  uint64_t seed64() const {
    return static_cast<uint32_t>(seed[0]) | static_cast<uint64_t>(static_cast<uint32_t>(seed[1])) << 32;
  }
  // drop(x)[i, j] in long double, with the mask of lora.h.
  long double xd(int64_t i, int64_t j) const {
    if (p == 0.0) return x[i * k + j];
    const bool keep = lora_keep(seed64(), static_cast<uint64_t>(i * k + j), lora_dropout_threshold(p));
    return keep ? static_cast<long double>(x[i * k + j]) / (1.0L - p) : 0.0L;
  }
  bool kept(int64_t i, int64_t j) const {
    return p == 0.0 || lora_keep(seed64(), static_cast<uint64_t>(i * k + j), lora_dropout_threshold(p));
  }
  void forward(std::vector<double>& y, std::vector<double>& xs) {
    y.assign(m * n, NAN);
    xs.assign(m * r, NAN);
    const TensorView bv = view(bias, DType::f64, {n});
    lora_linear(view(x, DType::f64, {m, k}), view(w, DType::f64, {n, k}), view(a, DType::f64, {r, k}),
                view(b, DType::f64, {n, r}), bv, s, dropout(), view(y, DType::f64, {m, n}),
                view(xs, DType::f64, {m, r}));
  }
  void backward(std::vector<double>& dy, std::vector<double>& dx, std::vector<double>& da, std::vector<double>& db) {
    dx.assign(m * k, NAN);
    da.assign(r * k, NAN);
    db.assign(n * r, NAN);
    lora_linear_backward(view(dy, DType::f64, {m, n}), view(x, DType::f64, {m, k}), view(w, DType::f64, {n, k}),
                         view(a, DType::f64, {r, k}), view(b, DType::f64, {n, r}), s, dropout(),
                         view(dx, DType::f64, {m, k}), view(da, DType::f64, {r, k}), view(db, DType::f64, {n, r}));
  }
};

double rel(const std::vector<double>& out, const std::vector<long double>& ref) {
  long double num = 0, den = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    EXPECT_FALSE(std::isnan(out[i])) << "NaN at " << i;
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return static_cast<double>(std::sqrt(num / den));
}

class LoraShapes : public ::testing::TestWithParam<std::tuple<int64_t, int64_t, int64_t, int64_t, double>> {};

TEST_P(LoraShapes, ForwardAndBackwardMatchLoops) {
  const auto [m, k, n, r, p] = GetParam();
  Problem pr(m, k, n, r, 2.0 / std::sqrt(static_cast<double>(r)), p);
  std::vector<double> y, xs;
  pr.forward(y, xs);
  std::vector<long double> yref(m * n), xsref(m * r), xa(m * r);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t q = 0; q < r; ++q) {
      long double acc = 0;
      for (int64_t j = 0; j < k; ++j) acc += pr.xd(i, j) * pr.a[q * k + j];
      xa[i * r + q] = acc;
      xsref[i * r + q] = pr.s * acc;
    }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t o = 0; o < n; ++o) {
      long double acc = pr.bias[o];
      for (int64_t j = 0; j < k; ++j) acc += static_cast<long double>(pr.x[i * k + j]) * pr.w[o * k + j];
      for (int64_t q = 0; q < r; ++q) acc += xsref[i * r + q] * pr.b[o * r + q];
      yref[i * n + o] = acc;
    }
  EXPECT_LT(rel(y, yref), 1e-13);
  EXPECT_LT(rel(xs, xsref), 1e-13);

  auto dy = randn(m * n, 9);
  std::vector<double> dx, da, db;
  pr.backward(dy, dx, da, db);
  std::vector<long double> g(m * r), dxref(m * k), daref(r * k), dbref(n * r);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t q = 0; q < r; ++q) {
      long double acc = 0;
      for (int64_t o = 0; o < n; ++o) acc += static_cast<long double>(dy[i * n + o]) * pr.b[o * r + q];
      g[i * r + q] = acc;
    }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < k; ++j) {
      long double base = 0, lora = 0;
      for (int64_t o = 0; o < n; ++o) base += static_cast<long double>(dy[i * n + o]) * pr.w[o * k + j];
      for (int64_t q = 0; q < r; ++q) lora += g[i * r + q] * pr.a[q * k + j];
      dxref[i * k + j] = base + (pr.kept(i, j) ? pr.s * lora / (1.0L - pr.p) : 0.0L);
    }
  for (int64_t q = 0; q < r; ++q)
    for (int64_t j = 0; j < k; ++j) {
      long double acc = 0;
      for (int64_t i = 0; i < m; ++i) acc += g[i * r + q] * pr.xd(i, j);
      daref[q * k + j] = pr.s * acc;
    }
  for (int64_t o = 0; o < n; ++o)
    for (int64_t q = 0; q < r; ++q) {
      long double acc = 0;
      for (int64_t i = 0; i < m; ++i) acc += static_cast<long double>(dy[i * n + o]) * xa[i * r + q];
      dbref[o * r + q] = pr.s * acc;
    }
  EXPECT_LT(rel(dx, dxref), 1e-13);
  EXPECT_LT(rel(da, daref), 1e-13);
  EXPECT_LT(rel(db, dbref), 1e-13);
}

INSTANTIATE_TEST_SUITE_P(Awkward, LoraShapes,
                         ::testing::Values(std::make_tuple(1, 24, 40, 8, 0.0), std::make_tuple(3, 37, 29, 8, 0.0),
                                           std::make_tuple(117, 45, 61, 16, 0.0), std::make_tuple(3, 37, 29, 8, 0.25),
                                           std::make_tuple(117, 45, 61, 16, 0.1), std::make_tuple(5, 19, 70, 19, 0.5)));

// The backward is the gradient of L = <R, y>: central differences in double.
TEST(Lora, BackwardIsTheGradientOfTheForward) {
  Problem pr(7, 13, 11, 4, 1.5, 0.3);
  auto dy = randn(pr.m * pr.n, 21);
  std::vector<double> dx, da, db;
  pr.backward(dy, dx, da, db);
  auto loss = [&]() {
    std::vector<double> y, xs;
    pr.forward(y, xs);
    long double l = 0;
    for (size_t i = 0; i < y.size(); ++i) l += static_cast<long double>(y[i]) * dy[i];
    return static_cast<double>(l);
  };
  const double h = 1e-6;
  for (auto [vec, grad] : {std::pair{&pr.x, &dx}, std::pair{&pr.a, &da}, std::pair{&pr.b, &db}}) {
    for (size_t i = 0; i < vec->size(); i += 3) {
      const double keep = (*vec)[i];
      (*vec)[i] = keep + h;
      const double up = loss();
      (*vec)[i] = keep - h;
      const double down = loss();
      (*vec)[i] = keep;
      EXPECT_NEAR((up - down) / (2 * h), (*grad)[i], 1e-6 * (1 + std::fabs((*grad)[i])));
    }
  }
}

TEST(Lora, FloatAndBfloat16PathsTrackFloat64) {
  Problem pr(33, 70, 50, 8, 2.0, 0.0);
  std::vector<double> y64, xs64;
  pr.forward(y64, xs64);
  std::vector<long double> ref(y64.begin(), y64.end());
  auto run = [&](auto tag, DType dt) {
    using T = decltype(tag);
    auto cvt = [](const std::vector<double>& v) { return std::vector<T>(v.begin(), v.end()); };
    auto x = cvt(pr.x), w = cvt(pr.w), a = cvt(pr.a), b = cvt(pr.b), bias = cvt(pr.bias);
    std::vector<T> y(pr.m * pr.n), xs(pr.m * pr.r);
    lora_linear(view(x, dt, {pr.m, pr.k}), view(w, dt, {pr.n, pr.k}), view(a, dt, {pr.r, pr.k}),
                view(b, dt, {pr.n, pr.r}), view(bias, dt, {pr.n}), pr.s, LoraDropout{}, view(y, dt, {pr.m, pr.n}),
                view(xs, dt, {pr.m, pr.r}));
    std::vector<double> out;
    for (T v : y) out.push_back(static_cast<double>(v));
    return out;
  };
  EXPECT_LT(rel(run(float{}, DType::f32), ref), 1e-5);
  EXPECT_LT(rel(run(Eigen::bfloat16{}, DType::bf16), ref), 1e-2);
  EXPECT_LT(rel(run(Eigen::half{}, DType::f16), ref), 1e-3);
}

TEST(Lora, DropoutMaskIsReproducibleAndHasTheRightRate) {
  const int64_t n = 200000;
  std::vector<float> x(n, 1.0f), out(n, NAN), again(n, NAN), other(n, NAN);
  std::vector<int32_t> seed{7, 8}, seed2{7, 9};
  for (double p : {0.05, 0.3, 0.9}) {
    lora_dropout(view(x, DType::f32, {400, 500}), LoraDropout{p, view(seed, DType::i32, {2})},
                 view(out, DType::f32, {400, 500}), false, 0);
    lora_dropout(view(x, DType::f32, {400, 500}), LoraDropout{p, view(seed, DType::i32, {2})},
                 view(again, DType::f32, {400, 500}), false, 0);
    lora_dropout(view(x, DType::f32, {400, 500}), LoraDropout{p, view(seed2, DType::i32, {2})},
                 view(other, DType::f32, {400, 500}), false, 0);
    int64_t kept = 0, differ = 0;
    const float inv = static_cast<float>(1.0 / (1.0 - p));
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_TRUE(out[i] == 0.0f || out[i] == inv) << i;
      ASSERT_EQ(out[i], again[i]);
      kept += out[i] != 0.0f;
      differ += out[i] != other[i];
    }
    const double rate = static_cast<double>(kept) / n, sd = std::sqrt(p * (1 - p) / n);
    EXPECT_NEAR(rate, 1.0 - p, 5 * sd) << p;
    EXPECT_GT(differ, n * p * (1 - p)) << "a different seed must give a different mask";
  }
  // accumulate adds drop(x) to what is there; p = 0 copies.
  std::vector<float> acc(n, 2.0f);
  lora_dropout(view(x, DType::f32, {1, n}), LoraDropout{}, view(acc, DType::f32, {1, n}), true, 0);
  for (float v : acc) ASSERT_EQ(v, 3.0f);
}

TEST(Lora, StridedBaseRowsAreRead) {
  Problem pr(5, 16, 12, 4, 1.0, 0.0);
  std::vector<double> y, xs;
  pr.forward(y, xs);
  std::vector<double> wide(pr.n * (pr.k + 4), NAN);  // the base in the first K columns of a workspace
  for (int64_t o = 0; o < pr.n; ++o)
    for (int64_t j = 0; j < pr.k; ++j) wide[o * (pr.k + 4) + j] = pr.w[o * pr.k + j];
  TensorView w = view(wide, DType::f64, {pr.n, pr.k + 4});
  w.shape = {pr.n, pr.k};
  std::vector<double> y2(pr.m * pr.n), xs2(pr.m * pr.r);
  lora_linear(view(pr.x, DType::f64, {pr.m, pr.k}), w, view(pr.a, DType::f64, {pr.r, pr.k}),
              view(pr.b, DType::f64, {pr.n, pr.r}), view(pr.bias, DType::f64, {pr.n}), pr.s, LoraDropout{},
              view(y2, DType::f64, {pr.m, pr.n}), view(xs2, DType::f64, {pr.m, pr.r}));
  EXPECT_EQ(y, y2);
}

TEST(Lora, DropoutIntoStridedRowsUsesTheLogicalIndex) {
  std::vector<float> x(6 * 10), dense(6 * 10, NAN), wide(6 * 13, NAN);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.5f + static_cast<float>(i);
  std::vector<int32_t> seed{3, 4};
  const LoraDropout d{0.5, view(seed, DType::i32, {2})};
  lora_dropout(view(x, DType::f32, {6, 10}), d, view(dense, DType::f32, {6, 10}), false, 0);
  TensorView out = view(wide, DType::f32, {6, 13});
  out.shape = {6, 10};
  lora_dropout(view(x, DType::f32, {6, 10}), d, out, false, 0);
  for (int64_t r = 0; r < 6; ++r) {
    for (int64_t c = 0; c < 10; ++c) EXPECT_EQ(wide[r * 13 + c], dense[r * 10 + c]);
    for (int64_t c = 10; c < 13; ++c) EXPECT_TRUE(std::isnan(wide[r * 13 + c])) << "wrote past the row";
  }
}

TEST(Lora, BadInputsNameTheArgument) {
  Problem pr(3, 16, 12, 4, 1.0, 0.0);
  std::vector<double> y(3 * 12), xs(3 * 4), none;
  std::vector<float> xf(3 * 16);
  std::vector<int32_t> seed{1, 2};
  auto call = [&](TensorView x, TensorView w, TensorView a, TensorView b, LoraDropout d, TensorView yv,
                  double s = 1.0) {
    lora_linear(x, w, a, b, std::nullopt, s, d, yv, view(xs, DType::f64, {3, 4}));
  };
  const TensorView x = view(pr.x, DType::f64, {3, 16}), w = view(pr.w, DType::f64, {12, 16}),
                   a = view(pr.a, DType::f64, {4, 16}), b = view(pr.b, DType::f64, {12, 4}),
                   yv = view(y, DType::f64, {3, 12});
  auto expect = [](auto fn, const char* what) {
    try {
      fn();
      ADD_FAILURE() << "no error for " << what;
    } catch (const Error& e) {
      EXPECT_TRUE(e.input());
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  expect(
      [&] {
        call(x, w, view(none, DType::f64, {0, 16}), b, {}, yv);
      },
      "rank r = a.shape[0] must be in [1, min(K, N) = 12], got 0");
  expect([&] { call(x, w, view(pr.a, DType::f64, {13, 16}), b, {}, yv); }, "must be in [1, min(K, N) = 12]");
  expect([&] { call(x, w, a, view(pr.b, DType::f64, {4, 12}), {}, yv); }, "b must have shape [12, 4]");
  expect([&] { call(x, view(pr.w, DType::f64, {16, 12}), a, b, {}, yv); }, "w must have shape [N, 16]");
  expect([&] { call(view(xf, DType::f32, {3, 16}), w, a, b, {}, yv); }, "w must have x's dtype float32");
  expect([&] { call(x, w, a, b, {}, view(y, DType::f64, {12, 3})); }, "y must have shape [3, 12]");
  expect([&] { call(x, w, a, b, LoraDropout{1.0, std::nullopt}, yv); }, "dropout p must be in [0, 1)");
  expect([&] { call(x, w, a, b, LoraDropout{0.5, std::nullopt}, yv); }, "needs a seed");
  expect([&] { call(x, w, a, b, LoraDropout{0.5, view(seed, DType::i32, {1})}, yv); }, "seed must be a contiguous");
  expect([&] { call(x, w, a, b, {}, yv, NAN); }, "scaling must be finite");
  TensorView xcuda = x;
  xcuda.device = Device::cuda;
  expect([&] { lora_dropout(x, {}, xcuda, false, 0); }, "must be on the same device");
}

}  // namespace
}  // namespace kindred
