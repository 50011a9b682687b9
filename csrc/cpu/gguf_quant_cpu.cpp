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

// Scale and min of each of a Q4_K / Q5_K block's 8 sub-blocks of 32 with levels 0..nmax (ggml's
// make_qkx2_quants, weights rms(x) + |x|): start from the min..max grid, then try nstep + 1 stretched grids, each
// followed by a weighted least-squares fit of scale and min, keeping the one of least weighted squared error.
// The 8 fits run side by side, sub-block j in lane j of 8-float vectors: each lane does a lone fit's float
// operations in its order (so the result is the same), and the lanes' sums are independent, where one fit alone
// waits on the latency of its running sums. `L` gets the levels (sub-block major), `scale` and `neg_min` (-min,
// >= 0) one value per sub-block.
constexpr int kSubs = 8, kSubLen = 32;
using Lanes = float __attribute__((vector_size(4 * kSubs)));
using LaneInts = int32_t __attribute__((vector_size(4 * kSubs)));

// q = clamp(nearest_int(v), lo, hi) in every lane (by reference: no vector-valued calls, whose ABI differs
// between builds with and without AVX)
inline void lane_levels(const Lanes& v, int lo, int hi, LaneInts& q) {
  const Lanes shifted = v + 12582912.f;
  LaneInts bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  q = (bits & 0x007FFFFF) - 0x00400000;
  const LaneInts zero = {}, bottom = zero + lo, top = zero + hi;
  q = q < bottom ? bottom : q;
  q = q > top ? top : q;
}

void fit_scale_min_k4(const float* x, int nmax, float rmin, float rdelta, int nstep, uint8_t* L, float* scale,
                      float* neg_min) {
  Lanes xt[kSubLen], w[kSubLen];
  for (int j = 0; j < kSubs; ++j)
    for (int i = 0; i < kSubLen; ++i) xt[i][j] = x[kSubLen * j + i];
  Lanes sum_x2 = {};
  for (int i = 0; i < kSubLen; ++i) sum_x2 += xt[i] * xt[i];
  Lanes av_x;
  for (int j = 0; j < kSubs; ++j) av_x[j] = std::sqrt(sum_x2[j] / kSubLen);
  for (int i = 0; i < kSubLen; ++i)
    for (int j = 0; j < kSubs; ++j) w[i][j] = av_x[j] + std::fabs(xt[i][j]);

  Lanes min = xt[0], max = xt[0], sum_w = w[0], sum_x = sum_w * xt[0];
  for (int i = 1; i < kSubLen; ++i) {
    min = xt[i] < min ? xt[i] : min;
    max = xt[i] > max ? xt[i] : max;
    sum_w += w[i];
    sum_x += w[i] * xt[i];
  }
  const Lanes zero = {};
  min = min > zero ? zero : min;
  const LaneInts flat = max == min;  // all levels 0, scale 0 (the lane's other values are never used)
  const Lanes iscale0 = static_cast<float>(nmax) / (max - min);
  Lanes best_scale = 1 / iscale0, best_min = min, best_error = {};
  LaneInts best_l[kSubLen];
  for (int i = 0; i < kSubLen; ++i) {
    lane_levels(iscale0 * (xt[i] - min), 0, nmax, best_l[i]);
    const Lanes diff = best_scale * __builtin_convertvector(best_l[i], Lanes) + min - xt[i];
    best_error += w[i] * (diff * diff);
  }
  for (int is = 0; is <= nstep; ++is) {
    // the grid starts at the best min so far, as in ggml
    const Lanes iscale = (rmin + rdelta * static_cast<float>(is) + static_cast<float>(nmax)) / (max - best_min);
    Lanes sum_l = {}, sum_l2 = {}, sum_xl = {};
    LaneInts trial[kSubLen];
    for (int i = 0; i < kSubLen; ++i) {
      lane_levels(iscale * (xt[i] - best_min), 0, nmax, trial[i]);
      const Lanes fl = __builtin_convertvector(trial[i], Lanes);
      sum_l += w[i] * fl;
      sum_l2 += w[i] * fl * fl;
      sum_xl += w[i] * fl * xt[i];
    }
    const Lanes D = sum_w * sum_l2 - sum_l * sum_l;
    Lanes this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
    Lanes this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
    const LaneInts clip = this_min > zero;  // a positive min is not allowed: min 0, scale refitted
    this_scale = clip ? sum_xl / sum_l2 : this_scale;
    this_min = clip ? zero : this_min;
    Lanes cur_error = {};
    for (int i = 0; i < kSubLen; ++i) {
      const Lanes diff = this_scale * __builtin_convertvector(trial[i], Lanes) + this_min - xt[i];
      cur_error += w[i] * (diff * diff);
    }
    const LaneInts better = ~flat & (D > zero) & (cur_error < best_error);
    best_error = better ? cur_error : best_error;
    best_scale = better ? this_scale : best_scale;
    best_min = better ? this_min : best_min;
    for (int i = 0; i < kSubLen; ++i) best_l[i] = better ? trial[i] : best_l[i];
  }
  for (int j = 0; j < kSubs; ++j) {
    neg_min[j] = -best_min[j];
    scale[j] = flat[j] ? 0.f : best_scale[j];
    for (int i = 0; i < kSubLen; ++i) L[kSubLen * j + i] = static_cast<uint8_t>(flat[j] ? 0 : best_l[i][j]);
  }
}

// Q4_K / Q5_K (nmax 15 / 31): per sub-block of 32 a fitted scale and min; both quantized to 6 bits against the
// block's largest (d, dmin in fp16); then every element re-quantized with the stored scales. L receives the
// 256 levels, `scales` the packed 12 bytes.
void quant_k4_levels(const float* x, int nmax, float rmin, int nstep, uint16_t& d16, uint16_t& dmin16, uint8_t* scales,
                     uint8_t* L) {
  float sc[kSubs], mn[kSubs];
  fit_scale_min_k4(x, nmax, rmin, 0.1f, nstep, L, sc, mn);
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < kSubs; ++j) {
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

// Symmetric scales of 8 sub-blocks of 16 (sub-block j at x + 16 j, in lane j) with levels -nmax..nmax-1
// weighted by x^2 (ggml's make_qx_quants, rmse type 1): the absmax grid, then 18 stretched grids around it,
// keeping the best weighted least-squares scale; lane by lane the float operations of a lone fit, as in
// fit_scale_min_k4. L gets level + nmax (sub-block major).
constexpr int kQ6Sub = 16;

void fit_scale_symmetric_q6(const float* x, int nmax, uint8_t* L, float* scale_out) {
  Lanes xt[kQ6Sub], w[kQ6Sub];
  for (int j = 0; j < kSubs; ++j)
    for (int i = 0; i < kQ6Sub; ++i) xt[i][j] = x[kQ6Sub * j + i];
  const Lanes zero = {};
  Lanes amax = {}, max = {};
  for (int i = 0; i < kQ6Sub; ++i) {
    const Lanes a = xt[i] < zero ? -xt[i] : xt[i];  // fabs (the sign bit of -0 aside, which < does not see)
    const LaneInts larger = amax < a;               // the first of tied magnitudes is kept
    amax = larger ? a : amax;
    max = larger ? xt[i] : max;
    w[i] = xt[i] * xt[i];
  }
  const LaneInts flat = amax < zero + kGroupMaxEps;  // all levels 0, scale 0
  const auto fit = [&](const Lanes& iscale, LaneInts* l, Lanes& sumlx, Lanes& suml2) {
    sumlx = suml2 = Lanes{};
    for (int i = 0; i < kQ6Sub; ++i) {
      lane_levels(iscale * xt[i], -nmax, nmax - 1, l[i]);
      const Lanes fl = __builtin_convertvector(l[i], Lanes);
      sumlx += w[i] * xt[i] * fl;
      suml2 += w[i] * fl * fl;
    }
  };
  LaneInts best_l[kQ6Sub], trial[kQ6Sub];
  Lanes sumlx, suml2;
  fit(static_cast<float>(-nmax) / max, best_l, sumlx, suml2);
  const LaneInts nonzero = suml2 != zero;
  Lanes scale = nonzero ? sumlx / suml2 : zero;
  Lanes best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    fit(-(static_cast<float>(nmax) + 0.1f * static_cast<float>(is)) / max, trial, sumlx, suml2);
    const LaneInts better = (suml2 > zero) & (sumlx * sumlx > best * suml2);
    scale = better ? sumlx / suml2 : scale;
    best = better ? scale * sumlx : best;
    for (int i = 0; i < kQ6Sub; ++i) best_l[i] = better ? trial[i] : best_l[i];
  }
  for (int j = 0; j < kSubs; ++j) {
    scale_out[j] = flat[j] ? 0.f : scale[j];
    for (int i = 0; i < kQ6Sub; ++i) L[kQ6Sub * j + i] = static_cast<uint8_t>(flat[j] ? 0 : nmax + best_l[i][j]);
  }
}

// Q6_K: 16 sub-blocks of 16 with a fitted symmetric scale each, the scales quantized to int8 against the
// largest (d in fp16), then every element re-quantized with its stored scale to -32..31.
void quant_q6_k(const float* x, uint8_t* p) {
  BlockQ6_K b;
  uint8_t L[kQkK];
  float scales[16];
  float max_scale = 0, max_abs_scale = 0;
  for (int half = 0; half < 2; ++half)
    fit_scale_symmetric_q6(x + 128 * half, 32, L + 128 * half, scales + kSubs * half);
  for (int ib = 0; ib < 16; ++ib) {
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
