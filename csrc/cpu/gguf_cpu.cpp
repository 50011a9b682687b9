// CPU dequantization of GGUF blocks, written from ggml's dequantize_row_* (ggml-quants.c). Each element is
// computed with the same float32 operations in the same order as ggml (and gguf-py's numpy reference), so
// results are bit-identical; the build disables fma contraction for this reason.
#include <Eigen/Core>
#include <cstring>

#include "kindred/dispatch.h"
#include "kindred/formats.h"
#include "kindred/gguf.h"

namespace kindred {
namespace {

using namespace formats::gguf;

template <typename Block>
Block load(const uint8_t* p) {
  Block b;
  std::memcpy(&b, p, sizeof(Block));  // the byte stream carries no alignment guarantee
  return b;
}

// Writes the 1, 32 or 256 elements of one block to y[0..].
void block_f16(const uint8_t* p, float* y) {
  y[0] = fp16_to_f32(load<uint16_t>(p));
}

void block_bf16(const uint8_t* p, float* y) {
  const uint32_t bits = static_cast<uint32_t>(load<uint16_t>(p)) << 16;
  std::memcpy(y, &bits, sizeof(bits));
}

void block_q4_0(const uint8_t* p, float* y) {
  const auto b = load<BlockQ4_0>(p);
  const float d = fp16_to_f32(b.d);
  for (int j = 0; j < kQk / 2; ++j) {
    y[j] = static_cast<float>((b.qs[j] & 0xF) - 8) * d;
    y[j + kQk / 2] = static_cast<float>((b.qs[j] >> 4) - 8) * d;
  }
}

void block_q4_1(const uint8_t* p, float* y) {
  const auto b = load<BlockQ4_1>(p);
  const float d = fp16_to_f32(b.d), m = fp16_to_f32(b.m);
  for (int j = 0; j < kQk / 2; ++j) {
    y[j] = static_cast<float>(b.qs[j] & 0xF) * d + m;
    y[j + kQk / 2] = static_cast<float>(b.qs[j] >> 4) * d + m;
  }
}

uint32_t qh_bits(const uint8_t* qh) {
  return static_cast<uint32_t>(qh[0]) | static_cast<uint32_t>(qh[1]) << 8 | static_cast<uint32_t>(qh[2]) << 16 |
         static_cast<uint32_t>(qh[3]) << 24;
}

void block_q5_0(const uint8_t* p, float* y) {
  const auto b = load<BlockQ5_0>(p);
  const float d = fp16_to_f32(b.d);
  const uint32_t qh = qh_bits(b.qh);
  for (int j = 0; j < kQk / 2; ++j) {
    const int lo = (b.qs[j] & 0xF) | static_cast<int>((qh >> j) & 1) << 4;
    const int hi = (b.qs[j] >> 4) | static_cast<int>((qh >> (j + 16)) & 1) << 4;
    y[j] = static_cast<float>(lo - 16) * d;
    y[j + kQk / 2] = static_cast<float>(hi - 16) * d;
  }
}

void block_q5_1(const uint8_t* p, float* y) {
  const auto b = load<BlockQ5_1>(p);
  const float d = fp16_to_f32(b.d), m = fp16_to_f32(b.m);
  const uint32_t qh = qh_bits(b.qh);
  for (int j = 0; j < kQk / 2; ++j) {
    const int lo = (b.qs[j] & 0xF) | static_cast<int>((qh >> j) & 1) << 4;
    const int hi = (b.qs[j] >> 4) | static_cast<int>((qh >> (j + 16)) & 1) << 4;
    y[j] = static_cast<float>(lo) * d + m;
    y[j + kQk / 2] = static_cast<float>(hi) * d + m;
  }
}

void block_q8_0(const uint8_t* p, float* y) {
  const auto b = load<BlockQ8_0>(p);
  const float d = fp16_to_f32(b.d);
  for (int j = 0; j < kQk; ++j) y[j] = static_cast<float>(b.qs[j]) * d;
}

// Q4_K and Q5_K share everything but the fifth bit (qh == nullptr for Q4_K).
void block_k4(float d, float dmin, const uint8_t* scales, const uint8_t* qh, const uint8_t* qs, float* y) {
  for (int s = 0; s < 8; ++s) {
    uint8_t sc, m;
    gguf_scale_min_k4(s, scales, sc, m);
    const float d1 = d * static_cast<float>(sc), m1 = dmin * static_cast<float>(m);
    const uint8_t* q = qs + 32 * (s / 2);
    const int shift = 4 * (s % 2);
    for (int l = 0; l < 32; ++l) {
      int v = (q[l] >> shift) & 0xF;
      if (qh != nullptr) v |= ((qh[l] >> s) & 1) << 4;
      y[32 * s + l] = d1 * static_cast<float>(v) - m1;
    }
  }
}

void block_q4_k(const uint8_t* p, float* y) {
  const auto b = load<BlockQ4_K>(p);
  block_k4(fp16_to_f32(b.d), fp16_to_f32(b.dmin), b.scales, nullptr, b.qs, y);
}

void block_q5_k(const uint8_t* p, float* y) {
  const auto b = load<BlockQ5_K>(p);
  block_k4(fp16_to_f32(b.d), fp16_to_f32(b.dmin), b.scales, b.qh, b.qs, y);
}

void block_q6_k(const uint8_t* p, float* y) {
  const auto b = load<BlockQ6_K>(p);
  const float d = fp16_to_f32(b.d);
  for (int half = 0; half < 2; ++half) {
    const uint8_t* ql = b.ql + 64 * half;
    const uint8_t* qh = b.qh + 32 * half;
    float* yh = y + 128 * half;
    for (int j = 0; j < 4; ++j) {
      for (int l = 0; l < 32; ++l) {
        const int lo = (ql[l + 32 * (j & 1)] >> (j >= 2 ? 4 : 0)) & 0xF;
        const int q = (lo | ((qh[l] >> (2 * j)) & 3) << 4) - 32;
        const int e = 32 * j + l;  // element within the half
        yh[e] = d * static_cast<float>(b.scales[8 * half + e / 16]) * static_cast<float>(q);
      }
    }
  }
}

using BlockFn = void (*)(const uint8_t*, float*);

BlockFn block_fn(int type) {
  switch (type) {
    case kF16:
      return block_f16;
    case kBF16:
      return block_bf16;
    case kQ4_0:
      return block_q4_0;
    case kQ4_1:
      return block_q4_1;
    case kQ5_0:
      return block_q5_0;
    case kQ5_1:
      return block_q5_1;
    case kQ8_0:
      return block_q8_0;
    case kQ4_K:
      return block_q4_k;
    case kQ5_K:
      return block_q5_k;
    case kQ6_K:
      return block_q6_k;
    default:
      KINDRED_CHECK(false, "ggml_type ", type, " has no CPU dequantizer");
  }
  return nullptr;
}

template <typename T>
void run(BlockFn fn, const GgmlTypeInfo& info, const uint8_t* src, T* dst, int64_t nblocks) {
#pragma omp parallel for
  for (int64_t i = 0; i < nblocks; ++i) {
    float y[kQkK];
    fn(src + i * info.block_bytes, y);
    for (int j = 0; j < info.block_elems; ++j) dst[i * info.block_elems + j] = static_cast<T>(y[j]);
  }
}

}  // namespace

void dequantize_gguf_cpu(int ggml_type, const TensorView& blocks, const TensorView& out) {
  const GgmlTypeInfo& info = *ggml_type_info(ggml_type);
  const BlockFn fn = block_fn(ggml_type);
  const int64_t nblocks = out.numel() / info.block_elems;
  const auto* src = blocks.ptr<uint8_t>();
  with_cpu_float(out.dtype, [&](auto tag) { run(fn, info, src, out.ptr<decltype(tag)>(), nblocks); });
}

}  // namespace kindred
