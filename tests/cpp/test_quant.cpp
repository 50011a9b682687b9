// CPU quant family against independent float64 computations: nearest-code property, error bounds, the AWQ
// nibble order on a hand-built case, and every argument check.
#include <gtest/gtest.h>

#include "views.h"

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "kindred/formats.h"
#include "kindred/quant.h"

namespace kindred {
namespace {

using testing::view;

std::vector<float> randn(int64_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.0f, 0.02f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(gen) + 1e-4f;  // non-zero
  return v;
}

struct Nf4Buffers {
  std::vector<uint8_t> packed, absmax_q;
  std::vector<float> absmax, nested_absmax, code, offset, workspace;
  Nf4Tensors tensors(int64_t n, int64_t bs, bool nested) {
    const int64_t blocks = n / bs;
    packed.assign(n / 2, 0xAB);
    Nf4Tensors t;
    t.blocksize = bs;
    t.packed = view(packed, DType::u8, {n / 2});
    if (!nested) {
      absmax.assign(blocks, NAN);
      t.absmax = view(absmax, DType::f32, {blocks});
      return t;
    }
    absmax_q.assign(blocks, 0);
    nested_absmax.assign((blocks + 255) / 256, NAN);
    code.assign(std::begin(formats::kDynamicMap), std::end(formats::kDynamicMap));
    offset.assign(1, NAN);
    workspace.assign(blocks, NAN);
    t.absmax = view(absmax_q, DType::u8, {blocks});
    t.nested_absmax = view(nested_absmax, DType::f32, {static_cast<int64_t>(nested_absmax.size())});
    t.nested_code = view(code, DType::f32, {256});
    t.offset = view(offset, DType::f32, {1});
    return t;
  }
};

TEST(Nf4, EncodeMapsEachCodebookValueToItself) {
  for (int i = 0; i < 16; ++i) EXPECT_EQ(formats::nf4_encode(formats::kNf4Codebook[i]), i);
  EXPECT_EQ(formats::nf4_encode(std::numeric_limits<float>::quiet_NaN()), 0);
}

TEST(Nf4, CodesAreNearestAndDequantizeWithinHalfGap) {
  for (int64_t bs : {32, 64, 256}) {
    const int64_t n = bs * 37;
    auto w = randn(n, 7 + bs);
    Nf4Buffers buf;
    Nf4Tensors q = buf.tensors(n, bs, false);
    quantize_nf4(view(w, DType::f32, {37, bs}), q, std::nullopt, 0);
    std::vector<float> out(n, NAN);
    dequantize_nf4(q, view(out, DType::f32, {37, bs}), 0);
    for (int64_t i = 0; i < n; ++i) {
      const double m = buf.absmax[i / bs];
      const int code = i % 2 ? buf.packed[i / 2] & 0xF : buf.packed[i / 2] >> 4;
      // Independent nearest-code search in double.
      int best = 0;
      for (int c = 1; c < 16; ++c)
        if (std::fabs(w[i] / m - formats::kNf4Codebook[c]) < std::fabs(w[i] / m - formats::kNf4Codebook[best]))
          best = c;
      ASSERT_EQ(code, best) << "element " << i;
      ASSERT_NEAR(out[i], formats::kNf4Codebook[code] * m, 1e-7 * m);
      ASSERT_LE(std::fabs(out[i] - w[i]), 0.5 * (1.0 - 0.6961928009986877) * m + 1e-7);
    }
  }
}

TEST(Nf4, DoubleQuantizationKeepsAbsmaxClose) {
  const int64_t bs = 64, n = bs * 700;  // 700 blocks: 3 nested blocks, the last one partial
  auto w = randn(n, 11);
  Nf4Buffers single, dq;
  Nf4Tensors qs = single.tensors(n, bs, false), qd = dq.tensors(n, bs, true);
  quantize_nf4(view(w, DType::f32, {n}), qs, std::nullopt, 0);
  std::optional<TensorView> ws = view(dq.workspace, DType::f32, {n / bs});
  quantize_nf4(view(w, DType::f32, {n}), qd, ws, 0);
  EXPECT_EQ(single.packed, dq.packed);  // the 4-bit codes do not depend on how absmax is stored
  double mean = 0;
  for (float a : single.absmax) mean += a;
  mean /= static_cast<double>(single.absmax.size());
  EXPECT_NEAR(dq.offset[0], mean, 1e-7 * mean);
  for (size_t b = 0; b < single.absmax.size(); ++b) {
    const double decoded = formats::kDynamicMap[dq.absmax_q[b]] * dq.nested_absmax[b / 256] + dq.offset[0];
    // The dynamic map's step near its ends is 0.0141 of the nested absmax; half of it bounds the error.
    ASSERT_NEAR(decoded, single.absmax[b], 0.0071 * dq.nested_absmax[b / 256] + 1e-7) << "block " << b;
  }
  std::vector<float> out(n, NAN);
  dequantize_nf4(qd, view(out, DType::f32, {n}), 0);
  for (int64_t i = 0; i < n; ++i) ASSERT_TRUE(std::isfinite(out[i]));
}

TEST(Int4g, QuantizeFollowsTheFormulaAndRoundTrips) {
  for (int64_t g : {32, 64, 128}) {
    const int64_t rows = 9, k = g * 3;
    auto w = randn(rows * k, 3 + g);
    std::vector<uint8_t> packed(rows * k / 2), zeros(rows * k / g);
    std::vector<uint16_t> scales(rows * k / g);
    Int4gTensors q{view(packed, DType::u8, {rows, k / 2}), view(scales, DType::f16, {rows, k / g}),
                   view(zeros, DType::u8, {rows, k / g}), g};
    quantize_int4g(view(w, DType::f32, {rows, k}), q, 0);
    std::vector<float> out(rows * k, NAN);
    dequantize_int4g(q, view(out, DType::f32, {rows, k}), 0);
    for (int64_t rg = 0; rg < rows * k / g; ++rg) {
      double lo = 1e30, hi = -1e30;
      for (int64_t i = 0; i < g; ++i) {
        lo = std::min<double>(lo, w[rg * g + i]);
        hi = std::max<double>(hi, w[rg * g + i]);
      }
      const double s = (hi - lo) / 15.0;
      for (int64_t i = 0; i < g; ++i) {
        // Within one (fp16-rounded) step of the input everywhere, half a step away from the clamped ends.
        ASSERT_LE(std::fabs(out[rg * g + i] - w[rg * g + i]), s * 1.01) << "group " << rg << " element " << i;
      }
    }
  }
}

TEST(Int4g, AwqNibbleOrderOnAHandBuiltCase) {
  const int64_t n = 16, k = 64, g = 32;
  std::vector<uint8_t> packed(n * k / 2), zeros(n * k / g);
  std::vector<uint16_t> scales(n * k / g);
  auto code = [](int64_t row, int64_t col) { return static_cast<uint8_t>((3 * row + col) % 16); };
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t c = 0; c < k; c += 2) packed[r * k / 2 + c / 2] = code(r, c) | code(r, c + 1) << 4;
    for (int64_t gi = 0; gi < k / g; ++gi) {
      zeros[r * (k / g) + gi] = static_cast<uint8_t>((r + gi) % 16);
      scales[r * (k / g) + gi] = static_cast<uint16_t>(0x3C00 + r * 2 + gi);
    }
  }
  Int4gTensors q{view(packed, DType::u8, {n, k / 2}), view(scales, DType::f16, {n, k / g}),
                 view(zeros, DType::u8, {n, k / g}), g};
  std::vector<int32_t> qweight(k * n / 8), qzeros(k / g * n / 8);
  std::vector<uint16_t> awq_scales(k / g * n);
  const TensorView qw = view(qweight, DType::i32, {k, n / 8}), qz = view(qzeros, DType::i32, {k / g, n / 8}),
                   sc = view(awq_scales, DType::f16, {k / g, n});
  awq_pack(q, qw, qz, sc);
  const int order[8] = {0, 2, 4, 6, 1, 3, 5, 7};  // AutoAWQ's AWQ_ORDER, typed here as the test's own oracle
  for (int64_t kk = 0; kk < k; ++kk)
    for (int64_t c = 0; c < n / 8; ++c)
      for (int i = 0; i < 8; ++i)
        ASSERT_EQ((static_cast<uint32_t>(qweight[kk * n / 8 + c]) >> (4 * i)) & 0xF, code(8 * c + order[i], kk));
  for (int64_t gi = 0; gi < k / g; ++gi)
    for (int64_t r = 0; r < n; ++r) {
      ASSERT_EQ((static_cast<uint32_t>(qzeros[gi * n / 8 + r / 8]) >> (4 *
                                                                       [&] {
                                                                         int i = 0;
                                                                         while (order[i] != r % 8) ++i;
                                                                         return i;
                                                                       }())) &
                    0xF,
                static_cast<uint32_t>((r + gi) % 16));
      ASSERT_EQ(awq_scales[gi * n + r], scales[r * (k / g) + gi]);
    }
  std::vector<uint8_t> packed2(packed.size()), zeros2(zeros.size());
  std::vector<uint16_t> scales2(scales.size());
  awq_unpack(qw, qz, sc,
             Int4gTensors{view(packed2, DType::u8, {n, k / 2}), view(scales2, DType::f16, {n, k / g}),
                          view(zeros2, DType::u8, {n, k / g}), g});
  EXPECT_EQ(packed2, packed);
  EXPECT_EQ(zeros2, zeros);
  EXPECT_EQ(scales2, scales);
}

void expect_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_TRUE(e.input());
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(Checks, BadArgumentsAreNamed) {
  auto w = randn(256, 1);
  Nf4Buffers buf;
  Nf4Tensors q = buf.tensors(256, 64, false);
  expect_error(
      [&] {
        quantize_nf4(view(w, DType::f32, {256}), Nf4Tensors{q.packed, q.absmax, {}, {}, {}, 48}, {}, 0);
      },
      "blocksize");
  expect_error([&] { quantize_nf4(view(w, DType::f32, {200}), q, {}, 0); }, "multiple of blocksize");
  expect_error([&] { quantize_nf4(view(w, DType::i32, {256}), q, {}, 0); }, "weight must be");
  TensorView strided = view(w, DType::f32, {16, 16});
  strided.strides = {1, 16};
  expect_error([&] { quantize_nf4(strided, q, {}, 0); }, "contiguous");
  Nf4Tensors truncated = q;
  truncated.absmax.shape = {3};
  expect_error([&] { dequantize_nf4(truncated, view(w, DType::f32, {256}), 0); }, "absmax must have 4 elements");
  w[77] = INFINITY;
  expect_error([&] { quantize_nf4(view(w, DType::f32, {256}), q, {}, 0); }, "flat index 77");
  TensorView on_gpu = view(w, DType::f32, {256});
  on_gpu.device = Device::cuda;
  expect_error([&] { quantize_nf4(on_gpu, q, {}, 0); }, "same device");
}

}  // namespace
}  // namespace kindred
