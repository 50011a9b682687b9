// CPU GGUF quantizers on hand-worked blocks (Q8_0, Q4_0 and Q4_1 values, the fp16 / bf16 encoders' rounding
// edges), a round trip of every type through the dequantizer, and the argument checks. (Random data is
// checked byte for byte against gguf-py and llama.cpp itself in tests/test_gguf_quant.py.)
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "kindred/formats.h"
#include "kindred/gguf.h"
#include "views.h"

namespace kindred {
namespace {

using namespace formats::gguf;

using testing::view;

std::vector<uint8_t> quant(int type, std::vector<float> x) {
  const GgmlTypeInfo& info = *ggml_type_info(type);
  std::vector<uint8_t> raw(x.size() / info.block_elems * info.block_bytes, 0xAB);
  quantize_gguf(type, view(x, DType::f32), view(raw, DType::u8));
  return raw;
}

TEST(GgufEncode, Fp16RoundsToNearestEven) {
  EXPECT_EQ(f32_to_fp16(1.0f), 0x3C00);
  EXPECT_EQ(f32_to_fp16(-2.0f), 0xC000);
  EXPECT_EQ(f32_to_fp16(1.0f + std::ldexp(1.0f, -11)), 0x3C00);  // a tie goes to the even mantissa
  EXPECT_EQ(f32_to_fp16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3C02);
  EXPECT_EQ(f32_to_fp16(65504.0f), 0x7BFF);
  EXPECT_EQ(f32_to_fp16(65520.0f), 0x7C00);               // rounds up to infinity
  EXPECT_EQ(f32_to_fp16(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(f32_to_fp16(std::ldexp(1.0f, -25)), 0x0000);  // half of it: a tie, to even (zero)
  EXPECT_EQ(f32_to_fp16(std::ldexp(1.5f, -25)), 0x0001);
  EXPECT_EQ(f32_to_fp16(std::nanf("")) & 0x7E00, 0x7E00);
  for (uint32_t h = 0; h < 0x7C00; ++h) EXPECT_EQ(f32_to_fp16(fp16_to_f32(static_cast<uint16_t>(h))), h) << h;
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(f32_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3F80);  // tie to even
  EXPECT_EQ(f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3F82);
}

TEST(GgufQuant, Q8_0ScaleAndRounding) {
  std::vector<float> x(32, 0.0f);
  x[0] = 127.0f;  // d = 1
  x[1] = -2.5f;   // rounds half away from zero
  x[2] = 0.49f;
  const auto raw = quant(kQ8_0, x);
  BlockQ8_0 b;
  std::memcpy(&b, raw.data(), sizeof(b));
  EXPECT_EQ(b.d, 0x3C00);
  EXPECT_EQ(b.qs[0], 127);
  EXPECT_EQ(b.qs[1], -3);
  EXPECT_EQ(b.qs[2], 0);
}

TEST(GgufQuant, Q4_0AndQ4_1ByHand) {
  std::vector<float> x(32);
  for (int j = 0; j < 32; ++j) x[j] = static_cast<float>(j - 16);  // the largest magnitude is -16: d = 2
  auto raw = quant(kQ4_0, x);
  BlockQ4_0 b;
  std::memcpy(&b, raw.data(), sizeof(b));
  EXPECT_EQ(b.d, 0x4000);
  EXPECT_EQ(b.qs[0] & 0xF, 0);  // -16 / 2 + 8.5 -> 0
  EXPECT_EQ(b.qs[0] >> 4, 8);   // element 16 is 0 -> 8
  raw = quant(kQ4_1, x);
  BlockQ4_1 a;
  std::memcpy(&a, raw.data(), sizeof(a));
  EXPECT_EQ(fp16_to_f32(a.m), -16.0f);
  EXPECT_EQ(a.d, f32_to_fp16(31.0f / 15));
  EXPECT_EQ(a.qs[15] >> 4, 15);  // the maximum, 15
}

TEST(GgufQuant, EveryTypeRoundTrips) {
  std::vector<float> x(512);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i)) * (1.0f + i % 7);
  for (const auto& t : kGgmlTypes) {
    auto raw = quant(t.id, x);
    std::vector<float> back(x.size());
    dequantize_gguf(t.id, view(raw, DType::u8), view(back, DType::f32));
    double err = 0, norm = 0;
    for (size_t i = 0; i < x.size(); ++i) err += (back[i] - x[i]) * (back[i] - x[i]), norm += x[i] * x[i];
    EXPECT_LT(std::sqrt(err / norm), 0.12) << t.name;
  }
}

TEST(GgufQuant, ZerosStayZero) {
  for (const auto& t : kGgmlTypes) {
    auto raw = quant(t.id, std::vector<float>(256, 0.0f));
    std::vector<float> back(256, 1.0f);
    dequantize_gguf(t.id, view(raw, DType::u8), view(back, DType::f32));
    for (float v : back) EXPECT_EQ(v, 0.0f) << t.name;
  }
}

TEST(GgufQuant, RejectsBadArguments) {
  const auto expect_error = [](auto&& fn, const char* needle) {
    try {
      fn();
      FAIL() << "no error; expected one mentioning " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_TRUE(e.input());
    }
  };
  std::vector<float> x(256, 1.0f);
  std::vector<uint8_t> raw(144);
  expect_error([&] { quantize_gguf(99, view(x, DType::f32), view(raw, DType::u8)); }, "ggml_type 99");
  std::vector<uint8_t> small(100);
  expect_error([&] { quantize_gguf(kQ4_K, view(x, DType::f32), view(small, DType::u8)); }, "blocks must hold 144");
  std::vector<float> odd(100);
  expect_error([&] { quantize_gguf(kQ4_K, view(odd, DType::f32), view(raw, DType::u8)); }, "x must have");
  x[7] = INFINITY;
  expect_error([&] { quantize_gguf(kQ4_K, view(x, DType::f32), view(raw, DType::u8)); }, "flat index 7");
  TensorView gpu = view(x, DType::f32);
  gpu.device = Device::cuda;
  expect_error([&] { quantize_gguf(kQ4_K, gpu, view(raw, DType::u8)); }, "x must be on the CPU");
}

}  // namespace
}  // namespace kindred
