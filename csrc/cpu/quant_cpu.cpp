// CPU implementations of the quant family: the reference the CUDA kernels are checked against.
// Arguments were validated by the dispatchers in csrc/quant.cpp. The AWQ repack is a load-time bit shuffle.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <vector>

#include "kindred/dispatch.h"
#include "kindred/formats.h"
#include "kindred/quant.h"

namespace kindred {
namespace {

using namespace formats;

// Calls fn(T*) with the view's data pointer typed by its float dtype.
template <typename Fn>
void with_float_ptr(const TensorView& t, Fn&& fn) {
  with_cpu_float(t.dtype, [&](auto tag) { fn(t.ptr<decltype(tag)>()); });
}

// Maps a flat element index of the dense tensor to its offset in `out` (rows may be strided, see quant.h).
struct OutIndex {
  int64_t width, ld;
  explicit OutIndex(const TensorView& out)
      : width(out.contiguous() ? out.numel() : out.shape[1]), ld(out.contiguous() ? out.numel() : out.strides[0]) {}
  int64_t operator()(int64_t e) const { return ld == width ? e : (e / width) * ld + e % width; }
};

// Mean of the absmax values in the fixed summation order of kOffsetLanes (shared with the CUDA path).
float absmax_mean(const float* a, int64_t blocks) {
  std::vector<double> lanes(kOffsetLanes, 0.0);
  for (int t = 0; t < kOffsetLanes; ++t)
    for (int64_t i = t; i < blocks; i += kOffsetLanes) lanes[t] += a[i];
  for (int s = kOffsetLanes / 2; s > 0; s >>= 1)
    for (int t = 0; t < s; ++t) lanes[t] += lanes[t + s];
  return static_cast<float>(lanes[0] / static_cast<double>(blocks));
}

}  // namespace

void quantize_nf4_cpu(const TensorView& weight, const Nf4Tensors& out, const std::optional<TensorView>& workspace) {
  const int64_t n = weight.numel(), bs = out.blocksize, blocks = n / bs;
  float* absmax = out.nested() ? workspace->ptr<float>() : out.absmax.ptr<float>();
  uint8_t* packed = out.packed.ptr<uint8_t>();
  with_float_ptr(weight, [&](auto* w) {
    check_finite(w, n, "weight");
#pragma omp parallel for
    for (int64_t b = 0; b < blocks; ++b) {
      const auto* wb = w + b * bs;
      float m = 0.0f;
      for (int64_t i = 0; i < bs; ++i) m = std::max(m, std::fabs(to_f32(wb[i])));
      absmax[b] = m;
      const float inv = m > 0.0f ? 1.0f / m : 0.0f;  // bitsandbytes scales by the reciprocal
      for (int64_t j = 0; j < bs / 2; ++j) {
        const uint8_t hi = nf4_encode(to_f32(wb[2 * j]) * inv);
        const uint8_t lo = nf4_encode(to_f32(wb[2 * j + 1]) * inv);
        packed[b * bs / 2 + j] = static_cast<uint8_t>(hi << 4 | lo);
      }
    }
  });
  if (!out.nested()) return;
  const float offset = absmax_mean(absmax, blocks);
  out.offset->ptr<float>()[0] = offset;
  const float* code = out.nested_code->ptr<float>();
  float* nested_absmax = out.nested_absmax->ptr<float>();
  uint8_t* q = out.absmax.ptr<uint8_t>();
  const int64_t nested_blocks = (blocks + kNestedBlocksize - 1) / kNestedBlocksize;
#pragma omp parallel for
  for (int64_t nb = 0; nb < nested_blocks; ++nb) {
    const int64_t lo = nb * kNestedBlocksize, hi = std::min(blocks, lo + kNestedBlocksize);
    float m = 0.0f;
    for (int64_t i = lo; i < hi; ++i) m = std::max(m, std::fabs(absmax[i] - offset));
    nested_absmax[nb] = m;
    const float inv = m > 0.0f ? 1.0f / m : 0.0f;
    for (int64_t i = lo; i < hi; ++i) q[i] = dynamic_encode(code, (absmax[i] - offset) * inv);
  }
}

void dequantize_nf4_cpu(const Nf4Tensors& in, const TensorView& out) {
  const int64_t n = out.numel(), bs = in.blocksize, blocks = n / bs;
  std::vector<float> nested_decoded;
  const float* absmax = nullptr;
  if (in.nested()) {
    nested_decoded.resize(blocks);
    const uint8_t* q = in.absmax.ptr<uint8_t>();
    const float* code = in.nested_code->ptr<float>();
    const float* nested_absmax = in.nested_absmax->ptr<float>();
    const float offset = in.offset->ptr<float>()[0];
    for (int64_t b = 0; b < blocks; ++b) {
      const float scaled = code[q[b]] * nested_absmax[b / kNestedBlocksize];  // rounded, then offset added
      nested_decoded[b] = scaled + offset;
    }
    absmax = nested_decoded.data();
  } else {
    absmax = in.absmax.ptr<float>();
  }
  const uint8_t* packed = in.packed.ptr<uint8_t>();
  const OutIndex at(out);
  with_float_ptr(out, [&](auto* o) {
    using T = std::remove_pointer_t<decltype(o)>;
#pragma omp parallel for
    for (int64_t b = 0; b < blocks; ++b) {
      const float m = absmax[b];
      T* ob = o + at(b * bs);  // a block never straddles a row (rows are whole blocks)
      for (int64_t j = 0; j < bs / 2; ++j) {
        const uint8_t byte = packed[b * bs / 2 + j];
        ob[2 * j] = static_cast<T>(kNf4Codebook[byte >> 4] * m);
        ob[2 * j + 1] = static_cast<T>(kNf4Codebook[byte & 0xF] * m);
      }
    }
  });
}

void quantize_int4g_cpu(const TensorView& weight, const Int4gTensors& out) {
  const int64_t n = weight.shape[0], k = weight.shape[1], g = out.group_size, groups = k / g;
  uint8_t* packed = out.packed.ptr<uint8_t>();
  Eigen::half* scales = out.scales.ptr<Eigen::half>();
  uint8_t* zeros = out.zeros.ptr<uint8_t>();
  with_float_ptr(weight, [&](auto* w) {
    check_finite(w, n * k, "weight");
    int64_t overflow = n * groups;
#pragma omp parallel for reduction(min : overflow)
    for (int64_t rg = 0; rg < n * groups; ++rg) {
      const auto* wg = w + rg * g;  // row r = rg / groups, group rg % groups: contiguous in [N, K]
      float lo = to_f32(wg[0]), hi = lo;
      for (int64_t i = 1; i < g; ++i) {
        lo = std::min(lo, to_f32(wg[i]));
        hi = std::max(hi, to_f32(wg[i]));
      }
      const Eigen::half s16(int4g_scale(lo, hi));
      const float s = static_cast<float>(s16);
      if (!std::isfinite(s) && rg < overflow) overflow = rg;
      const uint8_t z = int4g_zero(lo, s);
      scales[rg] = s16;
      zeros[rg] = z;
      for (int64_t i = 0; i < g; i += 2) {
        const uint8_t q0 = int4g_encode(to_f32(wg[i]), s, z), q1 = int4g_encode(to_f32(wg[i + 1]), s, z);
        packed[rg * g / 2 + i / 2] = static_cast<uint8_t>(q0 | q1 << 4);
      }
    }
    KINDRED_CHECK(overflow == n * groups, "weight row ", overflow / std::max<int64_t>(groups, 1), " group ",
                  overflow % std::max<int64_t>(groups, 1),
                  " spans a range too large for an fp16 scale (max 65504 * 15)");
  });
}

void dequantize_int4g_cpu(const Int4gTensors& in, const TensorView& out) {
  const int64_t n = out.shape[0], k = out.shape[1], g = in.group_size, groups = k / g;
  const uint8_t* packed = in.packed.ptr<uint8_t>();
  const Eigen::half* scales = in.scales.ptr<Eigen::half>();
  const uint8_t* zeros = in.zeros.ptr<uint8_t>();
  const OutIndex at(out);
  with_float_ptr(out, [&](auto* o) {
    using T = std::remove_pointer_t<decltype(o)>;
#pragma omp parallel for
    for (int64_t rg = 0; rg < n * groups; ++rg) {
      const float s = static_cast<float>(scales[rg]);
      const uint8_t z = zeros[rg];
      T* og = o + at(rg * g);
      for (int64_t i = 0; i < g; i += 2) {
        const uint8_t byte = packed[rg * g / 2 + i / 2];
        og[i] = static_cast<T>(int4g_decode(byte & 0xF, z, s));
        og[i + 1] = static_cast<T>(int4g_decode(byte >> 4, z, s));
      }
    }
  });
}

void awq_pack_cpu(const Int4gTensors& in, const TensorView& qweight, const TensorView& qzeros,
                  const TensorView& scales) {
  const int64_t n = in.packed.shape[0], k = 2 * in.packed.shape[1];
  const int64_t groups = k / in.group_size;
  const uint8_t* p = in.packed.ptr<uint8_t>();
  const uint8_t* z = in.zeros.ptr<uint8_t>();
  const uint16_t* s = in.scales.ptr<uint16_t>();
  uint32_t* qw = qweight.ptr<uint32_t>();
  uint32_t* qz = qzeros.ptr<uint32_t>();
  uint16_t* so = scales.ptr<uint16_t>();
#pragma omp parallel for
  for (int64_t kk = 0; kk < k; ++kk) {
    for (int64_t c = 0; c < n / 8; ++c) {
      uint32_t word = 0;
      for (int i = 0; i < 8; ++i) {
        const int64_t row = 8 * c + formats::kAwqOrder[i];
        const uint8_t byte = p[row * (k / 2) + kk / 2];
        word |= static_cast<uint32_t>(kk % 2 ? byte >> 4 : byte & 0xF) << (4 * i);
      }
      qw[kk * (n / 8) + c] = word;
    }
  }
  for (int64_t gi = 0; gi < groups; ++gi) {
    for (int64_t c = 0; c < n / 8; ++c) {
      uint32_t word = 0;
      for (int i = 0; i < 8; ++i)
        word |= static_cast<uint32_t>(z[(8 * c + formats::kAwqOrder[i]) * groups + gi] & 0xF) << (4 * i);
      qz[gi * (n / 8) + c] = word;
    }
    for (int64_t row = 0; row < n; ++row) so[gi * n + row] = s[row * groups + gi];
  }
}

void awq_unpack_cpu(const TensorView& qweight, const TensorView& qzeros, const TensorView& scales,
                    const Int4gTensors& out) {
  const int64_t n = out.packed.shape[0], k = 2 * out.packed.shape[1];
  const int64_t groups = k / out.group_size;
  const uint32_t* qw = qweight.ptr<uint32_t>();
  const uint32_t* qz = qzeros.ptr<uint32_t>();
  const uint16_t* si = scales.ptr<uint16_t>();
  uint8_t* p = out.packed.ptr<uint8_t>();
  uint8_t* z = out.zeros.ptr<uint8_t>();
  uint16_t* s = out.scales.ptr<uint16_t>();
#pragma omp parallel for
  for (int64_t row = 0; row < n; ++row) {
    const int64_t c = row / 8;
    int nib = 0;  // nibble of `row` within its packed column
    while (formats::kAwqOrder[nib] != row % 8) ++nib;
    for (int64_t kk = 0; kk < k; kk += 2) {
      const uint32_t lo = (qw[kk * (n / 8) + c] >> (4 * nib)) & 0xF;
      const uint32_t hi = (qw[(kk + 1) * (n / 8) + c] >> (4 * nib)) & 0xF;
      p[row * (k / 2) + kk / 2] = static_cast<uint8_t>(lo | hi << 4);
    }
    for (int64_t gi = 0; gi < groups; ++gi) {
      z[row * groups + gi] = static_cast<uint8_t>((qz[gi * (n / 8) + c] >> (4 * nib)) & 0xF);
      s[row * groups + gi] = si[gi * n + row];
    }
  }
}

}  // namespace kindred
