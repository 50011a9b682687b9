// CPU quantization to GGUF blocks, written from the description of llama.cpp's reference quantizers
// (quantize_row_*_ref in ggml-quants.c, no importance matrix). Every float operation is the one ggml does, in
// ggml's order, so the blocks are byte-identical to llama-quantize's; the build disables fma contraction.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kindred/dispatch.h"
#include "kindred/formats.h"
#include "kindred/gguf.h"

namespace kindred {
namespace {

using namespace formats::gguf;

constexpr float kGroupMaxEps = 1e-15f;  // a group whose largest |x| is below this is all zeros

template <typename Block>
void store(const Block& b, uint8_t* p) {
  std::memcpy(p, &b, sizeof(Block));  // the byte stream carries no alignment guarantee
}

// Round to nearest, ties to even, by adding 1.5 * 2^23 in float (ggml's nearest_int; valid for |v| < 2^22).
int nearest_int(float v) {
  const float shifted = v + 12582912.f;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  return (bits & 0x007FFFFF) - 0x00400000;
}

int clamp(int v, int lo, int hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// The value of largest magnitude (the first one on ties), and that magnitude.
float signed_absmax(const float* x, int n, float& amax) {
  float max = 0.f;
  amax = 0.f;
  for (int j = 0; j < n; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  return max;
}

void minmax(const float* x, int n, float& min, float& max) {
  min = 3.40282347e+38f;
  max = -3.40282347e+38f;
  for (int j = 0; j < n; ++j) {
    if (x[j] < min) min = x[j];
    if (x[j] > max) max = x[j];
  }
}

// Symmetric 4/5-bit legacy blocks: d = max / -2^(bits-1), q = min(2^bits - 1, trunc(x / d + 2^(bits-1) + 0.5)).
template <int Bits>
uint16_t symmetric(const float* x, uint8_t* q) {
  float amax;
  const float max = signed_absmax(x, kQk, amax);
  const float d = max / -static_cast<float>(1 << (Bits - 1));
  const float id = d != 0.f ? 1.0f / d : 0.0f;
  const float offset = static_cast<float>(1 << (Bits - 1)) + 0.5f;
  for (int j = 0; j < kQk; ++j)
    q[j] = static_cast<uint8_t>(std::min((1 << Bits) - 1, int{static_cast<int8_t>(x[j] * id + offset)}));
  return f32_to_fp16(d);
}

// Asymmetric 4/5-bit legacy blocks: d = (max - min) / (2^bits - 1), q = trunc((x - min) / d + 0.5).
template <int Bits>
void asymmetric(const float* x, uint8_t* q, uint16_t& d16, uint16_t& m16) {
  float min, max;
  minmax(x, kQk, min, max);
  const float d = (max - min) / static_cast<float>((1 << Bits) - 1);
  const float id = d != 0.f ? 1.0f / d : 0.0f;
  d16 = f32_to_fp16(d);
  m16 = f32_to_fp16(min);
  for (int j = 0; j < kQk; ++j) {
    const float v = (x[j] - min) * id + 0.5f;
    q[j] = Bits == 4 ? static_cast<uint8_t>(std::min(15, int{static_cast<int8_t>(v)})) : static_cast<uint8_t>(v);
  }
}

// Element j of a legacy block lives in byte j % 16, low nibble for the first half; bit 4 in qh bit j.
void pack_legacy(const uint8_t* q, uint8_t* qs, uint8_t* qh) {
  uint32_t high = 0;
  for (int j = 0; j < kQk / 2; ++j) {
    qs[j] = static_cast<uint8_t>((q[j] & 0xF) | (q[j + kQk / 2] & 0xF) << 4);
    high |= static_cast<uint32_t>(q[j] >> 4 & 1) << j | static_cast<uint32_t>(q[j + kQk / 2] >> 4 & 1) << (j + 16);
  }
  if (qh != nullptr) std::memcpy(qh, &high, sizeof(high));  // little-endian u32
}

void quant_q4_0(const float* x, uint8_t* p) {
  BlockQ4_0 b;
  uint8_t q[kQk];
  b.d = symmetric<4>(x, q);
  pack_legacy(q, b.qs, nullptr);
  store(b, p);
}

void quant_q5_0(const float* x, uint8_t* p) {
  BlockQ5_0 b;
  uint8_t q[kQk];
  b.d = symmetric<5>(x, q);
  pack_legacy(q, b.qs, b.qh);
  store(b, p);
}

void quant_q4_1(const float* x, uint8_t* p) {
  BlockQ4_1 b;
  uint8_t q[kQk];
  asymmetric<4>(x, q, b.d, b.m);
  pack_legacy(q, b.qs, nullptr);
  store(b, p);
}

void quant_q5_1(const float* x, uint8_t* p) {
  BlockQ5_1 b;
  uint8_t q[kQk];
  asymmetric<5>(x, q, b.d, b.m);
  pack_legacy(q, b.qs, b.qh);
  store(b, p);
}

// Q8_0: d = absmax / 127, q = round(x / d) (half away from zero).
void quant_q8_0(const float* x, uint8_t* p) {
  BlockQ8_0 b;
  float amax = 0.f;
  for (int j = 0; j < kQk; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.f;
  const float id = d != 0.f ? 1.0f / d : 0.0f;
  b.d = f32_to_fp16(d);
  for (int j = 0; j < kQk; ++j) b.qs[j] = static_cast<int8_t>(std::round(x[j] * id));
  store(b, p);
}

// Scale and min of one sub-block of n elements with levels 0..nmax (ggml's make_qkx2_quants): start from the
// min..max grid, then try nstep + 1 stretched grids, each followed by a weighted least-squares fit of scale and
// min, keeping the one of least weighted squared error. Returns the scale; `neg_min` gets -min (>= 0).
float fit_scale_min(int n, int nmax, const float* x, const float* w, uint8_t* L, float& neg_min, float rmin,
                    float rdelta, int nstep) {
  float min = x[0], max = x[0], sum_w = w[0], sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < min) min = x[i];
    if (x[i] > max) max = x[i];
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  if (min > 0) min = 0;
  if (max == min) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    neg_min = -min;
    return 0.f;
  }
  float iscale = static_cast<float>(nmax) / (max - min);
  float scale = 1 / iscale;
  float best_error = 0;
  for (int i = 0; i < n; ++i) {
    L[i] = static_cast<uint8_t>(clamp(nearest_int(iscale * (x[i] - min)), 0, nmax));
    const float diff = scale * static_cast<float>(L[i]) + min - x[i];
    best_error += w[i] * (diff * diff);
  }
  uint8_t trial[32];
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * static_cast<float>(is) + static_cast<float>(nmax)) / (max - min);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      const int l = clamp(nearest_int(iscale * (x[i] - min)), 0, nmax);
      trial[i] = static_cast<uint8_t>(l);
      const float fl = static_cast<float>(l);
      sum_l += w[i] * fl;
      sum_l2 += w[i] * fl * fl;
      sum_xl += w[i] * fl * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (D > 0) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
      if (this_min > 0) {
        this_min = 0;
        this_scale = sum_xl / sum_l2;
      }
      float cur_error = 0;
      for (int i = 0; i < n; ++i) {
        const float diff = this_scale * static_cast<float>(trial[i]) + this_min - x[i];
        cur_error += w[i] * (diff * diff);
      }
      if (cur_error < best_error) {
        std::memcpy(L, trial, static_cast<size_t>(n));
        best_error = cur_error;
        scale = this_scale;
        min = this_min;
      }
    }
  }
  neg_min = -min;
  return scale;
}

// Q4_K / Q5_K (nmax 15 / 31): per sub-block of 32 a fitted scale and min, weighted by rms(x) + |x|; both
// quantized to 6 bits against the block's largest (d, dmin in fp16); then every element re-quantized with the
// stored scales. L receives the 256 levels, `scales` the packed 12 bytes.
void quant_k4_levels(const float* x, int nmax, float rmin, int nstep, uint16_t& d16, uint16_t& dmin16, uint8_t* scales,
                     uint8_t* L) {
  float sc[8], mn[8], w[32];
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < 8; ++j) {
    const float* xs = x + 32 * j;
    float sum_x2 = 0;
    for (int l = 0; l < 32; ++l) sum_x2 += xs[l] * xs[l];
    const float av_x = std::sqrt(sum_x2 / 32);
    for (int l = 0; l < 32; ++l) w[l] = av_x + std::fabs(xs[l]);
    sc[j] = fit_scale_min(32, nmax, xs, w, L + 32 * j, mn[j], rmin, 0.1f, nstep);
    if (sc[j] > max_scale) max_scale = sc[j];
    if (mn[j] > max_min) max_min = mn[j];
  }
  const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
  const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
  for (int j = 0; j < 8; ++j) {
    const uint8_t ls = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int(inv_scale * sc[j])));
    const uint8_t lm = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int(inv_min * mn[j])));
    if (j < 4) {
      scales[j] = ls;
      scales[j + 4] = lm;
    } else {  // low 4 bits in bytes 8..11, top 2 bits in the top of bytes 0..7 (see gguf_scale_min_k4)
      scales[j + 4] = static_cast<uint8_t>((ls & 0xF) | (lm & 0xF) << 4);
      scales[j - 4] |= static_cast<uint8_t>((ls >> 4) << 6);
      scales[j] |= static_cast<uint8_t>((lm >> 4) << 6);
    }
  }
  d16 = f32_to_fp16(max_scale / 63.f);
  dmin16 = f32_to_fp16(max_min / 63.f);
  for (int j = 0; j < 8; ++j) {
    uint8_t s, m;
    gguf_scale_min_k4(j, scales, s, m);
    const float d = fp16_to_f32(d16) * static_cast<float>(s);
    if (d == 0.f) continue;  // keeps the fitted levels, as ggml does
    const float dm = fp16_to_f32(dmin16) * static_cast<float>(m);
    for (int i = 0; i < 32; ++i)
      L[32 * j + i] = static_cast<uint8_t>(clamp(nearest_int((x[32 * j + i] + dm) / d), 0, nmax));
  }
}

void quant_q4_k(const float* x, uint8_t* p) {
  BlockQ4_K b;
  uint8_t L[kQkK];
  quant_k4_levels(x, 15, -1.f, 20, b.d, b.dmin, b.scales, L);
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < 32; ++l) b.qs[32 * c + l] = static_cast<uint8_t>(L[64 * c + l] | L[64 * c + 32 + l] << 4);
  store(b, p);
}

void quant_q5_k(const float* x, uint8_t* p) {
  BlockQ5_K b;
  uint8_t L[kQkK];
  quant_k4_levels(x, 31, -0.5f, 15, b.d, b.dmin, b.scales, L);
  std::memset(b.qh, 0, sizeof(b.qh));
  for (int c = 0; c < 4; ++c) {
    for (int l = 0; l < 32; ++l) {
      const int lo = L[64 * c + l], hi = L[64 * c + 32 + l];
      b.qs[32 * c + l] = static_cast<uint8_t>((lo & 0xF) | (hi & 0xF) << 4);
      b.qh[l] |= static_cast<uint8_t>((lo >> 4) << (2 * c) | (hi >> 4) << (2 * c + 1));
    }
  }
  store(b, p);
}

// Symmetric scale of n elements with levels -nmax..nmax-1 weighted by x^2 (ggml's make_qx_quants, rmse type
// 1): the absmax grid, then 18 stretched grids around it, keeping the best weighted least-squares scale. L gets
// level + nmax.
float fit_scale_symmetric(int n, int nmax, const float* x, uint8_t* L) {
  float amax;
  const float max = signed_absmax(x, n, amax);
  if (amax < kGroupMaxEps) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  const auto fit = [&](float iscale, float& sumlx, float& suml2) {
    sumlx = suml2 = 0;
    for (int i = 0; i < n; ++i) {
      const float l = static_cast<float>(clamp(nearest_int(iscale * x[i]), -nmax, nmax - 1));
      const float w = x[i] * x[i];
      sumlx += w * x[i] * l;
      suml2 += w * l * l;
    }
  };
  const auto levels = [&](float iscale) {
    for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(nmax + clamp(nearest_int(iscale * x[i]), -nmax, nmax - 1));
  };
  float sumlx, suml2;
  float iscale = static_cast<float>(-nmax) / max;
  fit(iscale, sumlx, suml2);
  levels(iscale);
  float scale = suml2 != 0.f ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(static_cast<float>(nmax) + 0.1f * static_cast<float>(is)) / max;
    fit(iscale, sumlx, suml2);
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      levels(iscale);
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

// Q6_K: 16 sub-blocks of 16 with a fitted symmetric scale each, the scales quantized to int8 against the
// largest (d in fp16), then every element re-quantized with its stored scale to -32..31.
void quant_q6_k(const float* x, uint8_t* p) {
  BlockQ6_K b;
  uint8_t L[kQkK];
  float scales[16];
  float max_scale = 0, max_abs_scale = 0;
  for (int ib = 0; ib < 16; ++ib) {
    scales[ib] = fit_scale_symmetric(16, 32, x + 16 * ib, L + 16 * ib);
    if (std::fabs(scales[ib]) > max_abs_scale) {
      max_abs_scale = std::fabs(scales[ib]);
      max_scale = scales[ib];
    }
  }
  if (max_abs_scale < kGroupMaxEps) {
    std::memset(&b, 0, sizeof(b));
    store(b, p);
    return;
  }
  const float iscale = -128.f / max_scale;
  b.d = f32_to_fp16(1 / iscale);
  for (int ib = 0; ib < 16; ++ib) b.scales[ib] = static_cast<int8_t>(std::min(127, nearest_int(iscale * scales[ib])));
  for (int j = 0; j < 16; ++j) {
    const float d = fp16_to_f32(b.d) * static_cast<float>(b.scales[j]);
    if (d == 0.f) continue;  // keeps the fitted levels, as ggml does
    for (int i = 0; i < 16; ++i)
      L[16 * j + i] = static_cast<uint8_t>(clamp(nearest_int(x[16 * j + i] / d), -32, 31) + 32);
  }
  for (int half = 0; half < 2; ++half) {  // the layout of BlockQ6_K (formats.h)
    const uint8_t* Lh = L + 128 * half;
    for (int l = 0; l < 32; ++l) {
      b.ql[64 * half + l] = static_cast<uint8_t>((Lh[l] & 0xF) | (Lh[l + 64] & 0xF) << 4);
      b.ql[64 * half + l + 32] = static_cast<uint8_t>((Lh[l + 32] & 0xF) | (Lh[l + 96] & 0xF) << 4);
      b.qh[32 * half + l] =
          static_cast<uint8_t>(Lh[l] >> 4 | (Lh[l + 32] >> 4) << 2 | (Lh[l + 64] >> 4) << 4 | (Lh[l + 96] >> 4) << 6);
    }
  }
  store(b, p);
}

void quant_f16(const float* x, uint8_t* p) {
  const uint16_t h = f32_to_fp16(x[0]);
  std::memcpy(p, &h, 2);
}

void quant_bf16(const float* x, uint8_t* p) {
  const uint16_t h = f32_to_bf16(x[0]);
  std::memcpy(p, &h, 2);
}

using QuantFn = void (*)(const float*, uint8_t*);

QuantFn quant_fn(int type) {
  switch (type) {
    case kF16:
      return quant_f16;
    case kBF16:
      return quant_bf16;
    case kQ4_0:
      return quant_q4_0;
    case kQ4_1:
      return quant_q4_1;
    case kQ5_0:
      return quant_q5_0;
    case kQ5_1:
      return quant_q5_1;
    case kQ8_0:
      return quant_q8_0;
    case kQ4_K:
      return quant_q4_k;
    case kQ5_K:
      return quant_q5_k;
    case kQ6_K:
      return quant_q6_k;
    default:
      KINDRED_CHECK(false, "ggml_type ", type, " has no CPU quantizer");
  }
  return nullptr;
}

template <typename T>
void run(QuantFn fn, const GgmlTypeInfo& info, const T* src, uint8_t* dst, int64_t nblocks) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < nblocks; ++i) {
    float x[kQkK];
    for (int j = 0; j < info.block_elems; ++j) x[j] = static_cast<float>(src[i * info.block_elems + j]);
    fn(x, dst + i * info.block_bytes);
  }
}

}  // namespace

void quantize_gguf_cpu(int ggml_type, const TensorView& x, const TensorView& blocks) {
  const GgmlTypeInfo& info = *ggml_type_info(ggml_type);
  const QuantFn fn = quant_fn(ggml_type);
  const int64_t nblocks = x.numel() / info.block_elems;
  auto* dst = blocks.ptr<uint8_t>();
  with_cpu_float(x.dtype, [&](auto tag) {
    const auto* src = x.ptr<decltype(tag)>();
    check_finite(src, x.numel(), "x");
    run(fn, info, src, dst, nblocks);
  });
}

}  // namespace kindred
