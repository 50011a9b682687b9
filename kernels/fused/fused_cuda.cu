// CUDA kernels of the fused family (semantics: kindred/fused.h): the same float arithmetic and roundings as
// csrc/cpu/fused_cpu.cpp, except the order of the sums of squares (a warp/block tree here) and rsqrtf.
// Arguments were validated in csrc/fused.cpp.
// Test: pytest -m gpu tests/test_fused.py
#include "../common.cuh"
#include "kindred/fused.h"

namespace kindred {
namespace {

using cuda::from_f32;
using cuda::to_f32;

constexpr int kNormThreads = 1024;
constexpr int kNormPer = 16;  // values per thread
static_assert(kNormThreads * kNormPer == kAddRmsNormMaxCudaFeatures, "the row limit csrc/fused.cpp checks");
constexpr int kRopeWarps = 4;
constexpr int kMaxHeadDim = 512;  // csrc/fused.cpp refuses more

template <typename T>
__device__ __forceinline__ float rounded(float v) {
  return to_f32(from_f32<T>(v));
}

// One block per row: s = T(x + residual) to residual_out, then out = T(s · rsqrt(mean(s²) + eps) · w). Each
// thread holds its kNormPer values in registers: every load is issued before any store (residual may be
// residual_out, so a load after a store would wait for it: a global round trip per element).
template <typename T>
__global__ void __launch_bounds__(kNormThreads)
    add_rms_norm_kernel(const T* __restrict__ x, int64_t ldx, const T* residual, int64_t ldr, const T* __restrict__ w,
                        int d, float eps, T* __restrict__ out, T* residual_out) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * ldx;
  const T* rr = residual + row * ldr;
  T* so = residual_out + row * d;
  float s[kNormPer];
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < kNormPer; ++j) {
    const int i = threadIdx.x + j * kNormThreads;
    s[j] = i < d ? rounded<T>(to_f32(xr[i]) + to_f32(rr[i])) : 0.0f;
    sum += s[j] * s[j];
  }
#pragma unroll
  for (int j = 0; j < kNormPer; ++j) {
    const int i = threadIdx.x + j * kNormThreads;
    if (i < d) so[i] = from_f32<T>(s[j]);
  }
  __shared__ float partial[kNormThreads / 32];
  sum = cuda::warp_sum(sum);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < kNormThreads / 32 ? partial[threadIdx.x] : 0.0f;
    v = cuda::warp_sum(v);
    if (threadIdx.x == 0) partial[0] = v;
  }
  __syncthreads();
  const float inv = rsqrtf(partial[0] / static_cast<float>(d) + eps);
#pragma unroll
  for (int j = 0; j < kNormPer; ++j) {
    const int i = threadIdx.x + j * kNormThreads;
    if (i < d) out[row * d + i] = from_f32<T>(s[j] * inv * to_f32(w[i]));
  }
}

template <typename T>
__global__ void silu_mul_kernel(const T* __restrict__ gate, int64_t ldg, const T* __restrict__ up, int64_t ldu,
                                T* __restrict__ out, int64_t n, int64_t total) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t r = i / n, c = i - r * n;
    const float g = to_f32(gate[r * ldg + c]);
    const float act = rounded<T>(g / (1.0f + expf(-g)));
    out[i] = from_f32<T>(act * to_f32(up[r * ldu + c]));
  }
}

struct RopeArgs {
  const void *q, *k, *v, *q_norm, *k_norm, *cos, *sin;
  int64_t ldq, ldk, ldv, ldc, lds;
  void *cache_k, *cache_v, *q_out;
  const int64_t* slots;
  int heads, kv_heads, head_dim, rot;
  int64_t capacity;
  float eps;
};

// One warp per head of one row (blockIdx.y): q heads, then k heads, then v heads.
template <typename T>
__global__ void rope_qk_cache_kernel(RopeArgs a) {
  __shared__ float buf[kRopeWarps][kMaxHeadDim];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int head = blockIdx.x * kRopeWarps + warp;
  const int64_t row = blockIdx.y;
  const int d = a.head_dim;
  if (head >= a.heads + 2 * a.kv_heads) return;
  const int64_t slot = a.slots[row];
  const bool in_cache = slot >= 0 && slot < a.capacity;
  if (head >= a.heads + a.kv_heads) {  // v: copied into the cache
    const int hv = head - a.heads - a.kv_heads;
    if (!in_cache) return;
    const T* src = static_cast<const T*>(a.v) + row * a.ldv + static_cast<int64_t>(hv) * d;
    T* dst = static_cast<T*>(a.cache_v) + ((row * a.kv_heads + hv) * a.capacity + slot) * d;
    for (int i = lane; i < d; i += 32) dst[i] = src[i];
    return;
  }
  const bool is_q = head < a.heads;
  const int hk = is_q ? head : head - a.heads;
  if (!is_q && !in_cache) return;
  const T* src = is_q ? static_cast<const T*>(a.q) + row * a.ldq + static_cast<int64_t>(hk) * d
                      : static_cast<const T*>(a.k) + row * a.ldk + static_cast<int64_t>(hk) * d;
  const T* norm = static_cast<const T*>(is_q ? a.q_norm : a.k_norm);
  float* x = buf[warp];
  float sum = 0.0f;
  for (int i = lane; i < d; i += 32) {
    x[i] = to_f32(src[i]);
    sum += x[i] * x[i];
  }
  if (norm != nullptr) {
    const float inv = rsqrtf(cuda::warp_sum(sum) / static_cast<float>(d) + a.eps);
    for (int i = lane; i < d; i += 32) x[i] = rounded<T>(x[i] * inv * to_f32(norm[i]));
  }
  __syncwarp();
  const T* cos = static_cast<const T*>(a.cos) + row * a.ldc;
  const T* sin = static_cast<const T*>(a.sin) + row * a.lds;
  T* dst = is_q ? static_cast<T*>(a.q_out) + (row * a.heads + hk) * d
                : static_cast<T*>(a.cache_k) + ((row * a.kv_heads + hk) * a.capacity + slot) * d;
  const int half = a.rot / 2;
  for (int i = lane; i < d; i += 32) {
    float y = x[i];
    if (i < a.rot) {
      const float r = i < half ? -x[i + half] : x[i - half];
      y = rounded<T>(rounded<T>(x[i] * to_f32(cos[i])) + rounded<T>(r * to_f32(sin[i])));
    }
    dst[i] = from_f32<T>(y);
  }
}

int sm_count() {
  int sms = 0, device = 0;
  cuda::check(cudaGetDevice(&device), "cudaGetDevice");
  cuda::check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return sms;
}

}  // namespace

void add_rms_norm_cuda(const TensorView& x, const TensorView& residual, const TensorView& w, double eps,
                       const TensorView& out, const TensorView& residual_out, int64_t stream) {
  const cuda::DeviceGuard guard(x);
  cuda::with_float_type(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    add_rms_norm_kernel<T><<<static_cast<unsigned>(x.shape[0]), kNormThreads, 0, cuda::as_stream(stream)>>>(
        x.ptr<const T>(), x.strides[0], residual.ptr<const T>(), residual.strides[0], w.ptr<const T>(),
        static_cast<int>(x.shape[1]), static_cast<float>(eps), out.ptr<T>(), residual_out.ptr<T>());
  });
  cuda::check_launch("add_rms_norm_kernel");
}

void silu_mul_cuda(const TensorView& gate, const TensorView& up, const TensorView& out, int64_t stream) {
  const cuda::DeviceGuard guard(gate);
  const int64_t total = out.numel();
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, static_cast<int64_t>(sm_count()) * 8);
  cuda::with_float_type(gate.dtype, [&](auto tag) {
    using T = decltype(tag);
    silu_mul_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, cuda::as_stream(stream)>>>(
        gate.ptr<const T>(), gate.strides[0], up.ptr<const T>(), up.strides[0], out.ptr<T>(), out.shape[1], total);
  });
  cuda::check_launch("silu_mul_kernel");
}

void rope_qk_cache_cuda(const RopeQkCache& a, int64_t stream) {
  const cuda::DeviceGuard guard(a.cache_k);
  const int d = static_cast<int>(a.cache_k.shape[3]);
  RopeArgs args{a.q.data,
                a.k.data,
                a.v.data,
                a.q_norm ? a.q_norm->data : nullptr,
                a.k_norm ? a.k_norm->data : nullptr,
                a.cos.data,
                a.sin.data,
                a.q.strides[0],
                a.k.strides[0],
                a.v.strides[0],
                a.cos.strides[0],
                a.sin.strides[0],
                a.cache_k.data,
                a.cache_v.data,
                a.q_out.data,
                a.slots.ptr<const int64_t>(),
                static_cast<int>(a.q.shape[1] / d),
                static_cast<int>(a.cache_k.shape[1]),
                d,
                static_cast<int>(a.cos.shape[1]),
                a.cache_k.shape[2],
                static_cast<float>(a.eps)};
  const int heads = args.heads + 2 * args.kv_heads;
  const dim3 grid((heads + kRopeWarps - 1) / kRopeWarps, static_cast<unsigned>(a.q.shape[0]));
  cuda::with_float_type(a.q.dtype, [&](auto tag) {
    using T = decltype(tag);
    rope_qk_cache_kernel<T><<<grid, kRopeWarps * 32, 0, cuda::as_stream(stream)>>>(args);
  });
  cuda::check_launch("rope_qk_cache_kernel");
}

}  // namespace kindred
