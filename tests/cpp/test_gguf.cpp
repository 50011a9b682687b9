// CPU GGUF dequantizers on hand-built blocks whose values are worked out by hand from the block layouts,
// the fp16 decoder on edge cases, and every argument check. (Random blocks are checked bit-exactly against
// gguf-py's numpy reference in tests/test_gguf.py.)
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "kindred/formats.h"
#include "kindred/gguf.h"
#include "views.h"

namespace kindred {
namespace {

using namespace formats::gguf;

using testing::view;

template <typename Block>
std::vector<uint8_t> bytes(const Block& b) {
  std::vector<uint8_t> v(sizeof(Block));
  std::memcpy(v.data(), &b, sizeof(Block));
  return v;
}

std::vector<float> dequant(int type, std::vector<uint8_t> raw, int64_t n) {
  std::vector<float> out(n, NAN);
  dequantize_gguf(type, view(raw, DType::u8), view(out, DType::f32));
  return out;
}

constexpr uint16_t kOne = 0x3C00, kTwo = 0x4000, kHalf = 0x3800, kMinusOne = 0xBC00;

TEST(GgufFp16, DecodesEdgeCases) {
  EXPECT_EQ(fp16_to_f32(0x0000), 0.0f);
  EXPECT_TRUE(std::signbit(fp16_to_f32(0x8000)));
  EXPECT_EQ(fp16_to_f32(kOne), 1.0f);
  EXPECT_EQ(fp16_to_f32(0xC000), -2.0f);
  EXPECT_EQ(fp16_to_f32(0x7BFF), 65504.0f);
  EXPECT_EQ(fp16_to_f32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(fp16_to_f32(0x03FF), 1023.0f * std::ldexp(1.0f, -24));
  EXPECT_EQ(fp16_to_f32(0x0400), std::ldexp(1.0f, -14));  // smallest normal
  EXPECT_TRUE(std::isinf(fp16_to_f32(0x7C00)));
  EXPECT_TRUE(std::isnan(fp16_to_f32(0x7E00)));
}

TEST(GgufDequant, Q4_0NibbleOrderAndOffset) {
  BlockQ4_0 b{kTwo, {}};
  for (int j = 0; j < 16; ++j) b.qs[j] = static_cast<uint8_t>(j | (15 - j) << 4);
  const auto y = dequant(kQ4_0, bytes(b), 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], 2.0f * (j - 8)) << j;
    EXPECT_EQ(y[j + 16], 2.0f * (7 - j)) << j;
  }
}

TEST(GgufDequant, Q4_1ScaleAndMin) {
  BlockQ4_1 b{kHalf, kMinusOne, {}};
  for (int j = 0; j < 16; ++j) b.qs[j] = static_cast<uint8_t>(j | 3 << 4);
  const auto y = dequant(kQ4_1, bytes(b), 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], 0.5f * j - 1.0f);
    EXPECT_EQ(y[j + 16], 0.5f);
  }
}

TEST(GgufDequant, Q5_0AndQ5_1FifthBit) {
  BlockQ5_0 b0{kOne, {0x01, 0x00, 0x01, 0x80}, {}};  // bits 0, 16 and 31 set
  for (auto& q : b0.qs) q = 0x00;
  const auto y0 = dequant(kQ5_0, bytes(b0), 32);
  EXPECT_EQ(y0[0], 0.0f);    // 16 - 16
  EXPECT_EQ(y0[1], -16.0f);  // 0 - 16
  EXPECT_EQ(y0[16], 0.0f);   // bit 16 -> element 16
  EXPECT_EQ(y0[31], 0.0f);   // bit 31 -> element 31
  EXPECT_EQ(y0[30], -16.0f);
  BlockQ5_1 b1{kTwo, kOne, {0xFF, 0xFF, 0xFF, 0xFF}, {}};
  for (auto& q : b1.qs) q = 0xFF;
  const auto y1 = dequant(kQ5_1, bytes(b1), 32);
  for (float v : y1) EXPECT_EQ(v, 2.0f * 31 + 1.0f);
}

TEST(GgufDequant, Q8_0SignedCodes) {
  BlockQ8_0 b{kHalf, {}};
  for (int j = 0; j < 32; ++j) b.qs[j] = static_cast<int8_t>(j * 8 - 128);
  const auto y = dequant(kQ8_0, bytes(b), 32);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(y[j], 0.5f * (j * 8 - 128));
}

TEST(GgufDequant, Q4_KSixBitScalesAndMins) {
  BlockQ4_K b{kOne, kHalf, {}, {}};
  // Sub-block s gets scale s + 1 and min 2s; the upper four use the split 4+2-bit encoding.
  for (int s = 0; s < 4; ++s) {
    b.scales[s] = static_cast<uint8_t>(s + 1);
    b.scales[s + 4] = static_cast<uint8_t>(2 * s);
  }
  for (int s = 4; s < 8; ++s) {
    const int sc = s + 1, m = 2 * s;
    b.scales[s + 4] = static_cast<uint8_t>((sc & 0xF) | (m & 0xF) << 4);
    b.scales[s - 4] |= static_cast<uint8_t>((sc >> 4) << 6);
    b.scales[s] |= static_cast<uint8_t>((m >> 4) << 6);
  }
  for (int i = 0; i < 128; ++i) b.qs[i] = static_cast<uint8_t>(i % 16 | (15 - i % 16) << 4);
  const auto y = dequant(kQ4_K, bytes(b), 256);
  for (int s = 0; s < 8; ++s) {
    for (int l = 0; l < 32; ++l) {
      const int q = s % 2 == 0 ? l % 16 : 15 - l % 16;
      EXPECT_EQ(y[32 * s + l], static_cast<float>(s + 1) * q - 0.5f * (2 * s)) << s << " " << l;
    }
  }
}

TEST(GgufDequant, Q5_KHighBitPerSubBlock) {
  BlockQ5_K b{kOne, 0x0000, {}, {}, {}};
  for (int s = 0; s < 4; ++s) b.scales[s] = 1;
  for (int s = 4; s < 8; ++s) b.scales[s + 4] = 1;
  for (auto& h : b.qh) h = 0x0A;  // sub-blocks 1 and 3 get bit 4
  const auto y = dequant(kQ5_K, bytes(b), 256);
  for (int s = 0; s < 8; ++s)
    for (int l = 0; l < 32; ++l) EXPECT_EQ(y[32 * s + l], (s == 1 || s == 3) ? 16.0f : 0.0f);
}

TEST(GgufDequant, Q6_KLayout) {
  BlockQ6_K b{};
  b.d = kOne;
  for (int i = 0; i < 16; ++i) b.scales[i] = static_cast<int8_t>(i % 2 ? -1 : 2);
  for (int i = 0; i < 128; ++i) b.ql[i] = static_cast<uint8_t>(1 | 2 << 4);  // low 1, high 2
  for (int i = 0; i < 64; ++i) b.qh[i] = 0x1B;                               // 2-bit fields 3, 2, 1, 0
  const auto y = dequant(kQ6_K, bytes(b), 256);
  const int top[4] = {3, 2, 1, 0}, low[4] = {1, 1, 2, 2};
  for (int e = 0; e < 256; ++e) {
    const int j = (e % 128) / 32;
    const float scale = (e / 16) % 2 ? -1.0f : 2.0f;
    EXPECT_EQ(y[e], scale * static_cast<float>((low[j] | top[j] << 4) - 32)) << e;
  }
}

TEST(GgufDequant, WritesBf16AndF16) {
  BlockQ8_0 b{kOne, {}};
  for (int j = 0; j < 32; ++j) b.qs[j] = static_cast<int8_t>(j - 16);
  auto raw = bytes(b);
  std::vector<uint16_t> out(32, 0xFFFF);
  TensorView o = view(out, DType::bf16);
  dequantize_gguf(kQ8_0, view(raw, DType::u8), o);
  EXPECT_EQ(out[17], 0x3F80);  // bf16(1.0)
  o.dtype = DType::f16;
  dequantize_gguf(kQ8_0, view(raw, DType::u8), o);
  EXPECT_EQ(out[18], kTwo);
}

TEST(GgufDequant, RejectsBadArguments) {
  std::vector<uint8_t> raw(18, 0);
  std::vector<float> out(32);
  const auto expect_error = [](auto&& fn, const char* needle) {
    try {
      fn();
      FAIL() << "no error; expected one mentioning " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_TRUE(e.input());
    }
  };
  expect_error([&] { dequantize_gguf(12345, view(raw, DType::u8), view(out, DType::f32)); }, "ggml_type 12345");
  expect_error([&] { dequantize_gguf(kQ4_1, view(raw, DType::u8), view(out, DType::f32)); }, "blocks must hold 20");
  std::vector<float> odd(33);
  expect_error([&] { dequantize_gguf(kQ4_0, view(raw, DType::u8), view(odd, DType::f32)); }, "out must have");
  std::vector<int32_t> ints(32);
  expect_error([&] { dequantize_gguf(kQ4_0, view(raw, DType::u8), view(ints, DType::i32)); }, "out");
  TensorView gpu = view(out, DType::f32);
  gpu.device = Device::cuda;
  expect_error([&] { dequantize_gguf(kQ4_0, view(raw, DType::u8), gpu); }, "out must be on the CPU");
  TensorView strided = view(raw, DType::u8);
  strided.shape = {9};
  strided.strides = {2};
  expect_error([&] { dequantize_gguf(kQ4_0, strided, view(out, DType::f32)); }, "blocks");
}

}  // namespace
}  // namespace kindred
