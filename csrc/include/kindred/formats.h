// The 4-bit weight formats of kindred, each defined once. CPU and CUDA code include this
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

// Stored bits per weight: the 4-bit code and an fp32 absmax per block, or with double quantization an 8-bit
// absmax code per block and an fp32 scale per kNestedBlocksize blocks.
inline constexpr double nf4_bits_per_weight(int64_t blocksize, bool double_quant) {
  const double b = static_cast<double>(blocksize);
  return double_quant ? 4.0 + 8.0 / b + 32.0 / (b * kNestedBlocksize) : 4.0 + 32.0 / b;
}
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
// INT4 group-wise asymmetric ("INT4g"), AWQ-compatible. 4.156 bits/weight at group 128 (fp16 scale +
// 4-bit zero per group: 4 + 20 / 128).
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

inline constexpr int64_t kInt4gGroups[3] = {32, 64, 128};
inline bool int4g_group_ok(int64_t g) {
  for (int64_t ok : kInt4gGroups)
    if (g == ok) return true;
  return false;
}
// Stored bits per weight at group size g: the 4-bit code, an fp16 scale and a 4-bit zero point per group.
inline constexpr double int4g_bits_per_weight(int64_t g) {
  return 4.0 + (16.0 + 4.0) / static_cast<double>(g);
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

// ===================================================================================================
// GGUF block formats (section appended for the GGUF importer; ggml's ggml-common.h is the source).
// A GGUF tensor's rows run along ne[0] (the innermost dimension); a row is a sequence of blocks of
// kGgufBlock* elements. ggml_half is IEEE fp16, stored as raw bits. In the 32-element formats, byte j of
// `qs` holds element j in its low nibble and element j + 16 in its high nibble.
// ===================================================================================================
#include <cstring>

namespace kindred::formats::gguf {

// ggml_type ids as written in GGUF tensor infos (the formats kindred dequantizes and quantizes; F16 and BF16
// count as blocks of one element).
enum GgmlType : int {
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kBF16 = 30
};

inline constexpr int kQk = 32;    // elements per block of the legacy formats
inline constexpr int kQkK = 256;  // elements per super-block of the k-quants
inline constexpr int kScaleSizeK = 12;

// Q4_0: 4.5 bits/weight. x = (q - 8) * d.
struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[kQk / 2];
};
// Q4_1: 5.0 bits/weight. x = q * d + m.
struct BlockQ4_1 {
  uint16_t d, m;
  uint8_t qs[kQk / 2];
};
// Q5_0: 5.5 bits/weight. q = low nibble | bit j of qh (u32, little-endian) << 4; x = (q - 16) * d.
struct BlockQ5_0 {
  uint16_t d;
  uint8_t qh[4];
  uint8_t qs[kQk / 2];
};
// Q5_1: 6.0 bits/weight. q as Q5_0; x = q * d + m.
struct BlockQ5_1 {
  uint16_t d, m;
  uint8_t qh[4];
  uint8_t qs[kQk / 2];
};
// Q8_0: 8.5 bits/weight. x = q * d.
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[kQk];
};
// Q4_K: 4.5 bits/weight. 8 sub-blocks of 32 with 6-bit scale sc and min m (packed in `scales`, see
// gguf_scale_min_k4); x = (d * sc) * q - (dmin * m). Chunk c of 64 elements reads qs[32c .. 32c + 31]:
// low nibbles are sub-block 2c, high nibbles sub-block 2c + 1.
struct BlockQ4_K {
  uint16_t d, dmin;
  uint8_t scales[kScaleSizeK];
  uint8_t qs[kQkK / 2];
};
// Q5_K: 5.5 bits/weight. As Q4_K, plus bit s of qh[l] as bit 4 of element l of sub-block s.
struct BlockQ5_K {
  uint16_t d, dmin;
  uint8_t scales[kScaleSizeK];
  uint8_t qh[kQkK / 8];
  uint8_t qs[kQkK / 2];
};
// Q6_K: 6.5625 bits/weight. 16 sub-blocks of 16 with int8 scales; x = (d * scale) * (q - 32). In each half
// of 128 elements, element 32j + l (j < 4) takes its low 4 bits from ql[l + 32 (j & 1)] (high nibble
// when j >= 2) and its top 2 bits from bits 2j of qh[l]. Note d comes last.
struct BlockQ6_K {
  uint8_t ql[kQkK / 2];
  uint8_t qh[kQkK / 4];
  int8_t scales[kQkK / 16];
  uint16_t d;
};

static_assert(sizeof(BlockQ4_0) == 18, "Q4_0 block is 18 bytes");
static_assert(sizeof(BlockQ4_1) == 20, "Q4_1 block is 20 bytes");
static_assert(sizeof(BlockQ5_0) == 22, "Q5_0 block is 22 bytes");
static_assert(sizeof(BlockQ5_1) == 24, "Q5_1 block is 24 bytes");
static_assert(sizeof(BlockQ8_0) == 34, "Q8_0 block is 34 bytes");
static_assert(sizeof(BlockQ4_K) == 144, "Q4_K block is 144 bytes");
static_assert(sizeof(BlockQ5_K) == 176, "Q5_K block is 176 bytes");
static_assert(sizeof(BlockQ6_K) == 210, "Q6_K block is 210 bytes");

struct GgmlTypeInfo {
  int id;
  const char* name;
  int block_elems;
  int block_bytes;
};

inline constexpr GgmlTypeInfo kGgmlTypes[] = {
    {kF16, "F16", 1, 2},
    {kBF16, "BF16", 1, 2},
    {kQ4_0, "Q4_0", kQk, sizeof(BlockQ4_0)},
    {kQ4_1, "Q4_1", kQk, sizeof(BlockQ4_1)},
    {kQ5_0, "Q5_0", kQk, sizeof(BlockQ5_0)},
    {kQ5_1, "Q5_1", kQk, sizeof(BlockQ5_1)},
    {kQ8_0, "Q8_0", kQk, sizeof(BlockQ8_0)},
    {kQ4_K, "Q4_K", kQkK, sizeof(BlockQ4_K)},
    {kQ5_K, "Q5_K", kQkK, sizeof(BlockQ5_K)},
    {kQ6_K, "Q6_K", kQkK, sizeof(BlockQ6_K)},
};

// The block-format entry of ggml_type `id`, or nullptr when kindred does not dequantize it.
inline const GgmlTypeInfo* ggml_type_info(int id) {
  for (const auto& t : kGgmlTypes)
    if (t.id == id) return &t;
  return nullptr;
}

// Exact IEEE fp16 -> fp32 (every half is representable as a float).
KINDRED_HD float fp16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  const uint32_t bits = sign | (exp == 0x1F ? 0x7F800000u | (mant << 13) : ((exp + 112u) << 23) | (mant << 13));
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// fp32 -> IEEE fp16, rounding to nearest even; overflow gives infinity, NaN the quiet NaN 0x7E00 (ggml's
// GGML_FP32_TO_FP16 gives the same bits for every input).
KINDRED_HD uint16_t f32_to_fp16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return sign | 0x7E00u;
  if (a >= 0x47800000u) return sign | 0x7C00u;  // >= 65536 (and infinity)
  if (a <= 0x33000000u) return sign;            // <= 2^-25: rounds to zero (a tie at 2^-25 goes to even)
  const uint32_t e = a >> 23;
  uint32_t m = a & 0x7FFFFFu, shift = 13;
  uint32_t h;
  if (e >= 113) {  // normal half: rebias the exponent, keep 10 mantissa bits
    h = ((e - 112) << 10) | (m >> 13);
  } else {  // subnormal half: units of 2^-24
    m |= 0x800000u;
    shift = 126 - e;
    h = m >> shift;
  }
  const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
  if (rem > half || (rem == half && (h & 1))) ++h;  // a carry moves into the exponent, up to infinity
  return static_cast<uint16_t>(sign | h);
}

// fp32 -> bf16, rounding to nearest even; NaN stays NaN, forced quiet (ggml's GGML_FP32_TO_BF16).
KINDRED_HD uint16_t f32_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 64);
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1)) >> 16);
}

// 6-bit scale and min of sub-block j (0..7) of a Q4_K / Q5_K block (ggml's get_scale_min_k4).
KINDRED_HD void gguf_scale_min_k4(int j, const uint8_t* q, uint8_t& sc, uint8_t& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = static_cast<uint8_t>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    m = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

}  // namespace kindred::formats::gguf
