// CUDA implementations of the quant family (NF4 and INT4g quantize / dequantize). Bit-exact with the CPU
// reference in csrc/cpu/quant_cpu.cpp: same encoders (kindred/formats.h), same float operation order,
// no FMA contraction where the reference rounds twice. Arguments were validated in csrc/quant.cpp.
// Test: pytest -m gpu tests/test_quant.py
#include "../common.cuh"
#include "kindred/formats.h"
#include "kindred/quant.h"

namespace kindred {
namespace {

using namespace formats;
using cuda::from_f32;
using cuda::to_f32;

constexpr int kThreads = 256;
constexpr int kItemsPerThread = 4;  // independent 4-byte loads in flight per thread
__constant__ float kNf4Lut[16] = {KINDRED_NF4_CODEBOOK};

template <typename T>
struct alignas(sizeof(T) * 8) Vec8 {
  T v[8];
};

// Where the 8 values of flat element e land in `out`: rows of `width` elements `ld` apart (see quant.h).
struct OutRows {
  int64_t width, ld;
  __device__ __forceinline__ int64_t operator()(int64_t e) const {
    return ld == width ? e : (e / width) * ld + e % width;
  }
};

OutRows out_rows(const TensorView& out) {
  const bool flat = out.contiguous();
  return {flat ? out.numel() : out.shape[1], flat ? out.numel() : out.strides[0]};
}

// One warp per block of `bs` weights: absmax, then two codes per byte.
template <typename T>
__global__ void quantize_nf4_kernel(const T* __restrict__ w, uint8_t* __restrict__ packed, float* __restrict__ absmax,
                                    int64_t blocks, int bs) {
  const int64_t b = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (b >= blocks) return;
  const T* wb = w + b * bs;
  float m = 0.0f;
  for (int i = lane; i < bs; i += 32) m = fmaxf(m, fabsf(to_f32(wb[i])));
  m = cuda::warp_max(m);
  if (lane == 0) absmax[b] = m;
  const float inv = m > 0.0f ? 1.0f / m : 0.0f;
  for (int j = lane; j < bs / 2; j += 32) {
    const uint8_t hi = nf4_encode(__fmul_rn(to_f32(wb[2 * j]), inv));
    const uint8_t lo = nf4_encode(__fmul_rn(to_f32(wb[2 * j + 1]), inv));
    packed[b * (bs / 2) + j] = static_cast<uint8_t>(hi << 4 | lo);
  }
}

// Mean of absmax in the fixed order of the CPU path: strided partial sums in double, then a pairwise tree.
__global__ void __launch_bounds__(kOffsetLanes)
    absmax_mean_kernel(const float* __restrict__ absmax, int64_t blocks, float* __restrict__ offset) {
  __shared__ double lanes[kOffsetLanes];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < blocks; i += kOffsetLanes) s += absmax[i];
  lanes[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kOffsetLanes / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) lanes[threadIdx.x] += lanes[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) offset[0] = static_cast<float>(lanes[0] / static_cast<double>(blocks));
}

// One warp per 256 absmax values: 8-bit dynamic-map codes of (absmax - offset).
__global__ void quantize_nested_kernel(const float* __restrict__ absmax, const float* __restrict__ offset,
                                       const float* __restrict__ code, uint8_t* __restrict__ q,
                                       float* __restrict__ nested_absmax, int64_t blocks) {
  __shared__ float smem_code[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) smem_code[i] = code[i];
  __syncthreads();
  const int64_t nb = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (nb * kNestedBlocksize >= blocks) return;
  const float off = offset[0];
  const int64_t lo = nb * kNestedBlocksize, hi = min(blocks, lo + kNestedBlocksize);
  float m = 0.0f;
  for (int64_t i = lo + lane; i < hi; i += 32) m = fmaxf(m, fabsf(__fsub_rn(absmax[i], off)));
  m = cuda::warp_max(m);
  if (lane == 0) nested_absmax[nb] = m;
  const float inv = m > 0.0f ? 1.0f / m : 0.0f;
  for (int64_t i = lo + lane; i < hi; i += 32)
    q[i] = dynamic_encode(smem_code, __fmul_rn(__fsub_rn(absmax[i], off), inv));
}

// Each item is 4 packed bytes = 8 codes of one block (blocksize >= 32); each thread handles
// kItemsPerThread items strided by the block width so loads and 16-byte stores coalesce.
template <typename T, bool kNested>
__global__ void __launch_bounds__(kThreads)
    dequantize_nf4_kernel(const uint32_t* __restrict__ packed, const float* __restrict__ absmax_f32,
                          const uint8_t* __restrict__ absmax_q, const float* __restrict__ nested_absmax,
                          const float* __restrict__ nested_code, const float* __restrict__ offset, T* __restrict__ out,
                          OutRows at, int64_t items, int log2_bs) {
  __shared__ float lut[16];
  __shared__ float code2[kNested ? 256 : 1];
  if (threadIdx.x < 16) lut[threadIdx.x] = kNf4Lut[threadIdx.x];
  if (kNested)
    for (int i = threadIdx.x; i < 256; i += kThreads) code2[i] = nested_code[i];
  __syncthreads();
  const float off = kNested ? offset[0] : 0.0f;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * kItemsPerThread + threadIdx.x;
  uint32_t words[kItemsPerThread];
  float scale[kItemsPerThread];
#pragma unroll
  for (int it = 0; it < kItemsPerThread; ++it) {
    const int64_t item = base + it * kThreads;
    if (item >= items) break;
    words[it] = __ldg(packed + item);
    const int64_t b = (item * 8) >> log2_bs;
    scale[it] =
        kNested ? __fadd_rn(__fmul_rn(code2[absmax_q[b]], nested_absmax[b / kNestedBlocksize]), off) : absmax_f32[b];
  }
#pragma unroll
  for (int it = 0; it < kItemsPerThread; ++it) {
    const int64_t item = base + it * kThreads;
    if (item >= items) break;
    Vec8<T> v;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t byte = (words[it] >> (8 * j)) & 0xFF;  // little-endian: byte j of the word
      v.v[2 * j] = from_f32<T>(__fmul_rn(lut[byte >> 4], scale[it]));
      v.v[2 * j + 1] = from_f32<T>(__fmul_rn(lut[byte & 0xF], scale[it]));
    }
    *reinterpret_cast<Vec8<T>*>(out + at(item * 8)) = v;
  }
}

// One warp per group of g <= 128 weights of one row; each lane handles pairs (2 lane + 64 i, +1).
template <typename T>
__global__ void quantize_int4g_kernel(const T* __restrict__ w, uint8_t* __restrict__ packed,
                                      __half* __restrict__ scales, uint8_t* __restrict__ zeros, int64_t row_groups,
                                      int g) {
  const int64_t rg = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (rg >= row_groups) return;
  const T* wg = w + rg * g;
  float lo = INFINITY, hi = -INFINITY;
  for (int i = 2 * lane; i < g; i += 64) {
    const float a = to_f32(wg[i]), b = to_f32(wg[i + 1]);
    lo = fminf(lo, fminf(a, b));
    hi = fmaxf(hi, fmaxf(a, b));
  }
  lo = cuda::warp_min(lo);
  hi = cuda::warp_max(hi);
  const __half s16 = __float2half_rn(int4g_scale(lo, hi));
  const float s = __half2float(s16);
  const uint8_t z = int4g_zero(lo, s);
  if (lane == 0) {
    scales[rg] = s16;
    zeros[rg] = z;
  }
  for (int i = 2 * lane; i < g; i += 64) {
    const uint8_t q0 = int4g_encode(to_f32(wg[i]), s, z), q1 = int4g_encode(to_f32(wg[i + 1]), s, z);
    packed[rg * (g / 2) + i / 2] = static_cast<uint8_t>(q0 | q1 << 4);
  }
}

// Items of 4 packed bytes = 8 codes of one group (low nibble first), as in dequantize_nf4_kernel.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    dequantize_int4g_kernel(const uint32_t* __restrict__ packed, const __half* __restrict__ scales,
                            const uint8_t* __restrict__ zeros, T* __restrict__ out, OutRows at, int64_t items,
                            int log2_g) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * kItemsPerThread + threadIdx.x;
  uint32_t words[kItemsPerThread];
  float s[kItemsPerThread];
  uint8_t z[kItemsPerThread];
#pragma unroll
  for (int it = 0; it < kItemsPerThread; ++it) {
    const int64_t item = base + it * kThreads;
    if (item >= items) break;
    words[it] = __ldg(packed + item);
    const int64_t gi = (item * 8) >> log2_g;
    s[it] = __half2float(scales[gi]);
    z[it] = zeros[gi];
  }
#pragma unroll
  for (int it = 0; it < kItemsPerThread; ++it) {
    const int64_t item = base + it * kThreads;
    if (item >= items) break;
    Vec8<T> v;
#pragma unroll
    for (int j = 0; j < 8; ++j) v.v[j] = from_f32<T>(int4g_decode((words[it] >> (4 * j)) & 0xF, z[it], s[it]));
    *reinterpret_cast<Vec8<T>*>(out + at(item * 8)) = v;
  }
}

int log2_exact(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

unsigned grid_for(int64_t units, int64_t per_block) {
  return static_cast<unsigned>((units + per_block - 1) / per_block);
}

}  // namespace

void quantize_nf4_cuda(const TensorView& weight, const Nf4Tensors& out, const std::optional<TensorView>& workspace,
                       int64_t stream) {
  cuda::DeviceGuard guard(weight);
  const cudaStream_t st = cuda::as_stream(stream);
  const int64_t blocks = weight.numel() / out.blocksize;
  float* absmax = out.nested() ? workspace->ptr<float>() : out.absmax.ptr<float>();
  cuda::with_float_type(weight.dtype, [&](auto tag) {
    using T = decltype(tag);
    quantize_nf4_kernel<T><<<grid_for(blocks * 32, kThreads), kThreads, 0, st>>>(
        weight.ptr<T>(), out.packed.ptr<uint8_t>(), absmax, blocks, static_cast<int>(out.blocksize));
  });
  cuda::check_launch("quantize_nf4_kernel");
  if (!out.nested()) return;
  absmax_mean_kernel<<<1, kOffsetLanes, 0, st>>>(absmax, blocks, out.offset->ptr<float>());
  cuda::check_launch("absmax_mean_kernel");
  const int64_t nested_blocks = (blocks + kNestedBlocksize - 1) / kNestedBlocksize;
  quantize_nested_kernel<<<grid_for(nested_blocks * 32, kThreads), kThreads, 0, st>>>(
      absmax, out.offset->ptr<float>(), out.nested_code->ptr<float>(), out.absmax.ptr<uint8_t>(),
      out.nested_absmax->ptr<float>(), blocks);
  cuda::check_launch("quantize_nested_kernel");
}

void dequantize_nf4_cuda(const Nf4Tensors& in, const TensorView& out, int64_t stream) {
  cuda::DeviceGuard guard(out);
  cuda::check_aligned(in.packed, "packed", 4);
  cuda::check_aligned(out, "out", 16);
  const int64_t items = out.numel() / 8;
  const unsigned grid = grid_for(items, kThreads * kItemsPerThread);
  const int log2_bs = log2_exact(in.blocksize);
  cuda::with_float_type(out.dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto* packed = in.packed.ptr<uint32_t>();
    if (in.nested()) {
      dequantize_nf4_kernel<T, true><<<grid, kThreads, 0, cuda::as_stream(stream)>>>(
          packed, nullptr, in.absmax.ptr<uint8_t>(), in.nested_absmax->ptr<float>(), in.nested_code->ptr<float>(),
          in.offset->ptr<float>(), out.ptr<T>(), out_rows(out), items, log2_bs);
    } else {
      dequantize_nf4_kernel<T, false>
          <<<grid, kThreads, 0, cuda::as_stream(stream)>>>(packed, in.absmax.ptr<float>(), nullptr, nullptr, nullptr,
                                                           nullptr, out.ptr<T>(), out_rows(out), items, log2_bs);
    }
  });
  cuda::check_launch("dequantize_nf4_kernel");
}

void quantize_int4g_cuda(const TensorView& weight, const Int4gTensors& out, int64_t stream) {
  cuda::DeviceGuard guard(weight);
  const int64_t row_groups = weight.numel() / out.group_size;
  cuda::with_float_type(weight.dtype, [&](auto tag) {
    using T = decltype(tag);
    quantize_int4g_kernel<T><<<grid_for(row_groups * 32, kThreads), kThreads, 0, cuda::as_stream(stream)>>>(
        weight.ptr<T>(), out.packed.ptr<uint8_t>(), out.scales.ptr<__half>(), out.zeros.ptr<uint8_t>(), row_groups,
        static_cast<int>(out.group_size));
  });
  cuda::check_launch("quantize_int4g_kernel");
}

void dequantize_int4g_cuda(const Int4gTensors& in, const TensorView& out, int64_t stream) {
  cuda::DeviceGuard guard(out);
  cuda::check_aligned(in.packed, "packed", 4);
  cuda::check_aligned(out, "out", 16);
  const int64_t items = out.numel() / 8;
  cuda::with_float_type(out.dtype, [&](auto tag) {
    using T = decltype(tag);
    dequantize_int4g_kernel<T><<<grid_for(items, kThreads * kItemsPerThread), kThreads, 0, cuda::as_stream(stream)>>>(
        in.packed.ptr<uint32_t>(), in.scales.ptr<__half>(), in.zeros.ptr<uint8_t>(), out.ptr<T>(), out_rows(out), items,
        log2_exact(in.group_size));
  });
  cuda::check_launch("dequantize_int4g_kernel");
}

}  // namespace kindred
