// The 4-bit weight formats of kindred, each defined once (design.md §2). CPU and CUDA code include this
// header; Python reads the tables through kindred._core and never retypes them.
#pragma once

#include <cmath>
#include <cstdint>

#include "kindred/common.h"

#if defined(__CUDACC__)
#define KINDRED_UNROLL _Pragma("unroll")
#else
#define KINDRED_UNROLL
#endif

namespace kindred::formats {

// ---------------------------------------------------------------------------------------------------
// NF4, exactly as bitsandbytes stores it (QLoRA). 4.5 bits/weight with an fp32 absmax per 64 weights,
// 4.127 with double quantization.
// - Codebook: 16 normal quantiles scaled to [-1, 1], code 7 = 0.0 (bitsandbytes get_4bit_type("nf4")).
// - A block is `blocksize` consecutive elements of the flattened tensor; absmax = max |w| of the block.
// - Code of w: the nearest codebook entry to w * (1 / absmax), ties to the lower code (bitsandbytes'
//   decision tree over the midpoints). An all-zero block encodes as code 7 (exact zero).
// - Packing: two codes per byte in flat order, element 2j in the high nibble, 2j+1 in the low one.
// - Double quantization: offset = mean(absmax); absmax - offset is quantized blockwise (256 per block)
//   to 8 bits with the signed dynamic map below; absmax = map[q] * nested_absmax[b / 256] + offset.
#define KINDRED_NF4_CODEBOOK                                                                          \
  -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,    \
      -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f, \
      0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f

inline constexpr float kNf4Codebook[16] = {KINDRED_NF4_CODEBOOK};
inline constexpr int64_t kNf4DefaultBlocksize = 64;
inline constexpr int64_t kNf4MinBlocksize = 32;
inline constexpr int64_t kNf4MaxBlocksize = 4096;
inline constexpr int64_t kNestedBlocksize = 256;
// The absmax mean is summed in double over this many strided partial sums, then a pairwise tree, so the
// CPU and CUDA paths give the same offset bit for bit.
inline constexpr int kOffsetLanes = 1024;

inline bool nf4_blocksize_ok(int64_t b) {
  return b >= kNf4MinBlocksize && b <= kNf4MaxBlocksize && (b & (b - 1)) == 0;
}

// Code of x = w / absmax: the number of codebook midpoints strictly below x (NaN gives 0).
KINDRED_HD uint8_t nf4_encode(float x) {
  constexpr float c[16] = {KINDRED_NF4_CODEBOOK};
  int q = 0;
  KINDRED_UNROLL
  for (int i = 0; i < 15; ++i) q += x > (c[i] + c[i + 1]) * 0.5f;
  return static_cast<uint8_t>(q);
}

// The signed 8-bit "dynamic" map of bitsandbytes (create_dynamic_map(signed=True)), ascending.
#define KINDRED_DYNAMIC_MAP                                                                                            \
  -0.992968738f, -0.978906274f, -0.96484375f, -0.950781226f, -0.936718762f, -0.922656238f, -0.908593774f,              \
      -0.89453125f, -0.880468726f, -0.866406262f, -0.852343738f, -0.838281274f, -0.82421875f, -0.810156226f,           \
      -0.796093762f, -0.782031238f, -0.767968774f, -0.75390625f, -0.739843726f, -0.725781262f, -0.711718798f,          \
      -0.697656274f, -0.68359375f, -0.669531226f, -0.655468762f, -0.641406298f, -0.627343774f, -0.61328125f,           \
      -0.599218726f, -0.585156262f, -0.571093798f, -0.557031274f, -0.54296875f, -0.528906226f, -0.514843702f,          \
      -0.500781238f, -0.486718714f, -0.47265625f, -0.458593726f, -0.444531262f, -0.430468738f, -0.416406244f,          \
      -0.40234375f, -0.388281226f, -0.374218762f, -0.360156238f, -0.346093744f, -0.33203125f, -0.317968726f,           \
      -0.303906262f, -0.289843738f, -0.275781274f, -0.26171875f, -0.247656241f, -0.233593747f, -0.219531253f,          \
      -0.205468744f, -0.19140625f, -0.177343756f, -0.163281247f, -0.149218753f, -0.135156244f, -0.12109375f,           \
      -0.107031256f, -0.0985937491f, -0.0957812592f, -0.0929687545f, -0.0901562497f, -0.0873437524f, -0.0845312476f,   \
      -0.0817187577f, -0.078906253f, -0.0760937482f, -0.0732812509f, -0.0704687461f, -0.0676562563f, -0.0648437515f,   \
      -0.0620312504f, -0.0592187531f, -0.0564062484f, -0.053593751f, -0.05078125f, -0.047968749f, -0.0451562516f,      \
      -0.0423437469f, -0.0395312496f, -0.0367187522f, -0.0339062512f, -0.0310937501f, -0.028281251f, -0.0254687499f,   \
      -0.0226562507f, -0.0198437516f, -0.0170312505f, -0.0142187504f, -0.0114062503f, -0.00971874967f,                 \
      -0.00915624946f, -0.00859375019f, -0.00803124998f, -0.00746874977f, -0.00690625003f, -0.00634374982f,            \
      -0.00578125007f, -0.00521875033f, -0.00465624966f, -0.00409374991f, -0.00353124971f, -0.00296874996f,            \
      -0.00240624999f, -0.00184375001f, -0.00128124992f, -0.000943750085f, -0.000831249985f, -0.00071875006f,          \
      -0.000606250076f, -0.000493750034f, -0.000381250022f, -0.000268750038f, -0.000156250011f, -8.87499991e-05f,      \
      -6.62500024e-05f, -4.37499984e-05f, -2.12499981e-05f, -7.7499999e-06f, -3.25000019e-06f, -5.50000038e-07f, 0.0f, \
      5.50000038e-07f, 3.25000019e-06f, 7.7499999e-06f, 2.12499981e-05f, 4.37499984e-05f, 6.62500024e-05f,             \
      8.87499991e-05f, 0.000156250011f, 0.000268750038f, 0.000381250022f, 0.000493750034f, 0.000606250076f,            \
      0.00071875006f, 0.000831249985f, 0.000943750085f, 0.00128124992f, 0.00184375001f, 0.00240624999f,                \
      0.00296874996f, 0.00353124971f, 0.00409374991f, 0.00465624966f, 0.00521875033f, 0.00578125007f, 0.00634374982f,  \
      0.00690625003f, 0.00746874977f, 0.00803124998f, 0.00859375019f, 0.00915624946f, 0.00971874967f, 0.0114062503f,   \
      0.0142187504f, 0.0170312505f, 0.0198437516f, 0.0226562507f, 0.0254687499f, 0.028281251f, 0.0310937501f,          \
      0.0339062512f, 0.0367187522f, 0.0395312496f, 0.0423437469f, 0.0451562516f, 0.047968749f, 0.05078125f,            \
      0.053593751f, 0.0564062484f, 0.0592187531f, 0.0620312504f, 0.0648437515f, 0.0676562563f, 0.0704687461f,          \
      0.0732812509f, 0.0760937482f, 0.078906253f, 0.0817187577f, 0.0845312476f, 0.0873437524f, 0.0901562497f,          \
      0.0929687545f, 0.0957812592f, 0.0985937491f, 0.107031256f, 0.12109375f, 0.135156244f, 0.149218753f,              \
      0.163281247f, 0.177343756f, 0.19140625f, 0.205468744f, 0.219531253f, 0.233593747f, 0.247656241f, 0.26171875f,    \
      0.275781274f, 0.289843738f, 0.303906262f, 0.317968726f, 0.33203125f, 0.346093744f, 0.360156238f, 0.374218762f,   \
      0.388281226f, 0.40234375f, 0.416406244f, 0.430468738f, 0.444531262f, 0.458593726f, 0.47265625f, 0.486718714f,    \
      0.500781238f, 0.514843702f, 0.528906226f, 0.54296875f, 0.557031274f, 0.571093798f, 0.585156262f, 0.599218726f,   \
      0.61328125f, 0.627343774f, 0.641406298f, 0.655468762f, 0.669531226f, 0.68359375f, 0.697656274f, 0.711718798f,    \
      0.725781262f, 0.739843726f, 0.75390625f, 0.767968774f, 0.782031238f, 0.796093762f, 0.810156226f, 0.82421875f,    \
      0.838281274f, 0.852343738f, 0.866406262f, 0.880468726f, 0.89453125f, 0.908593774f, 0.922656238f, 0.936718762f,   \
      0.950781226f, 0.96484375f, 0.978906274f, 0.992968738f, 1.0f

inline constexpr float kDynamicMap[256] = {KINDRED_DYNAMIC_MAP};

// bitsandbytes' 8-bit blockwise encoder (dQuantize, non-stochastic): a 7-step binary search over the
// ascending 256-entry `code`, then the nearer of the two neighbours by their float midpoint.
KINDRED_HD uint8_t dynamic_encode(const float* code, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = code[pivot];
  for (int i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > val) return static_cast<uint8_t>(x > (upper + val) * 0.5f ? upper_pivot : pivot);
  return static_cast<uint8_t>(x < (lower + val) * 0.5f ? lower_pivot : pivot);
}

// ---------------------------------------------------------------------------------------------------
// INT4 group-wise asymmetric ("INT4g"), AWQ-compatible. 4.25 bits/weight at group 128 (fp16 scale +
// 4-bit zero per group).
// - Weight [N, K] (out, in); groups of g consecutive K-elements of one row; g in {32, 64, 128}.
// - s = fp16(max(wmax - wmin, 1e-5) / 15); z = clamp(rint(-wmin / s), 0, 15);
//   q = clamp(rint(w / s) + z, 0, 15) (rint: round half to even); w ~ (q - z) * s.
// - kindred layout: packed uint8 [N, K/2] (element k in the low nibble of byte k/2 when k is even),
//   scales fp16 [N, K/g], zeros uint8 [N, K/g].
// - AutoAWQ GEMM layout: qweight int32 [K, N/8], qzeros int32 [K/g, N/8], scales fp16 [K/g, N]; nibble i
//   (bits 4i..4i+3) of packed column c holds output column 8c + kAwqOrder[i].
inline constexpr int64_t kInt4gDefaultGroup = 128;
inline constexpr float kInt4gMinRange = 1e-5f;
inline constexpr float kInt4gMaxQ = 15.0f;
inline constexpr int kAwqOrder[8] = {0, 2, 4, 6, 1, 3, 5, 7};

inline bool int4g_group_ok(int64_t g) {
  return g == 32 || g == 64 || g == 128;
}

// Unrounded scale of a group; the caller rounds it to fp16 and uses the rounded value from then on.
KINDRED_HD float int4g_scale(float wmin, float wmax) {
  float range = wmax - wmin;
  return (range > kInt4gMinRange ? range : kInt4gMinRange) / kInt4gMaxQ;
}

KINDRED_HD uint8_t int4g_zero(float wmin, float s) {
  float z = rintf(-wmin / s);
  return static_cast<uint8_t>(z < 0.0f ? 0.0f : (z > kInt4gMaxQ ? kInt4gMaxQ : z));
}

KINDRED_HD uint8_t int4g_encode(float w, float s, uint8_t z) {
  float q = rintf(w / s) + static_cast<float>(z);
  return static_cast<uint8_t>(q < 0.0f ? 0.0f : (q > kInt4gMaxQ ? kInt4gMaxQ : q));
}

KINDRED_HD float int4g_decode(uint8_t q, uint8_t z, float s) {
  return (static_cast<float>(q) - static_cast<float>(z)) * s;
}

}  // namespace kindred::formats
