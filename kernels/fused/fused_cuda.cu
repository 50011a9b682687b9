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
static_assert(kMaxHeadDim == kRopeMaxCudaHeadDim, "the head_dim limit csrc/fused.cpp checks");
constexpr int kRotateThreads = 256;
constexpr int kRotateHeadsPer = 2;  // heads a rope_rotate thread loads at once (2 ran fastest on H200: 1, 4, 8 slower)
constexpr int kEltThreads = 256;

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

// V values of T in one access: 16 bytes on the vector paths, one value on their scalar fallbacks.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

// T(T(a · b) + T(c · d)) as torch's mul and add round it: __fmul_rn / __fadd_rn are never contracted to an fma.
template <typename T>
__device__ __forceinline__ T mul_add(float a, float b, float c, float d) {
  return from_f32<T>(__fadd_rn(rounded<T>(__fmul_rn(a, b)), rounded<T>(__fmul_rn(c, d))));
}

struct RotateArgs {
  const void *x, *cos, *sin;
  void* out;
  int64_t ldx, ldh, ldc, lds;  // x's row and head strides, cos's and sin's row strides (elements)
  int64_t rows;
  int heads, d, rot;
  int lanes, groups, rows_per_block;  // threads per row and head group, head groups per row, rows per block
  bool inverse;
};

// Thread (lane, group) of row blockIdx.x · rows_per_block + r: chunk j of V pairs (x_i, x_{i+half}) (or, past
// the pairs, V pass-through values) of heads group, group + groups, ..., with the chunk's cos and sin loaded
// once for all of them; each batch of kRotateHeadsPer heads is loaded before any of it is stored. The transpose
// only swaps and negates the sin factors: y_i = x_i·c_i − x_{i+half}·s'_i, y_{i+half} = x_{i+half}·c_{i+half} +
// x_i·s'_{i+half} with s' = (s_lo, s_hi) forward and (−s_hi, −s_lo) inverse (negation is exact).
template <typename T, int V>
__global__ void __launch_bounds__(kRotateThreads) rope_rotate_kernel(RotateArgs a) {
  using P = Pack<T, V>;
  const int half = a.rot / 2, pairs = half / V, chunks = pairs + (a.d - a.rot) / V;
  const int lane = threadIdx.x % a.lanes, rest = threadIdx.x / a.lanes;
  const int group = rest % a.groups;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * a.rows_per_block + rest / a.groups;
  if (row >= a.rows) return;
  const T* x = static_cast<const T*>(a.x) + row * a.ldx;
  T* out = static_cast<T*>(a.out) + row * a.heads * a.d;
  for (int j = lane; j < chunks; j += a.lanes) {
    if (j >= pairs) {  // pass-through
      const int at = a.rot + (j - pairs) * V;
      for (int h = group; h < a.heads; h += a.groups) store<T, V>(out + h * a.d + at, load<T, V>(x + h * a.ldh + at));
      continue;
    }
    const int lo = j * V, hi = lo + half;
    const T* cos = static_cast<const T*>(a.cos) + row * a.ldc;
    const T* sin = static_cast<const T*>(a.sin) + row * a.lds;
    const P c_lo = load<T, V>(cos + lo), c_hi = load<T, V>(cos + hi);
    const P s_lo = load<T, V>(sin + (a.inverse ? hi : lo)), s_hi = load<T, V>(sin + (a.inverse ? lo : hi));
    const float sign = a.inverse ? -1.0f : 1.0f;
    for (int h0 = group; h0 < a.heads; h0 += a.groups * kRotateHeadsPer) {
      P xl[kRotateHeadsPer], xh[kRotateHeadsPer];
#pragma unroll
      for (int b = 0; b < kRotateHeadsPer; ++b) {
        const int h = h0 + b * a.groups;
        if (h < a.heads) {
          xl[b] = load<T, V>(x + h * a.ldh + lo);
          xh[b] = load<T, V>(x + h * a.ldh + hi);
        }
      }
#pragma unroll
      for (int b = 0; b < kRotateHeadsPer; ++b) {
        const int h = h0 + b * a.groups;
        if (h >= a.heads) break;
        P yl, yh;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float l = to_f32(xl[b].v[k]), r = to_f32(xh[b].v[k]);
          yl.v[k] = mul_add<T>(l, to_f32(c_lo.v[k]), -r, sign * to_f32(s_lo.v[k]));
          yh.v[k] = mul_add<T>(r, to_f32(c_hi.v[k]), l, sign * to_f32(s_hi.v[k]));
        }
        store<T, V>(out + h * a.d + lo, yl);
        store<T, V>(out + h * a.d + hi, yh);
      }
    }
  }
}

// Grid-stride over the V-value chunks of [M, I]; silu_mul's forward recomputed, then torch's silu_backward as
// nvcc compiles its CUDA kernel: 1 + g·(1 − σ) one fma, nothing else fused (equal to eager autograd on H200).
template <typename T, int V>
__global__ void silu_mul_backward_kernel(const T* __restrict__ dout, int64_t ldd, const T* __restrict__ gate,
                                         int64_t ldg, const T* __restrict__ up, int64_t ldu, T* __restrict__ dgate,
                                         T* __restrict__ dup, int64_t n, int64_t total) {
  using P = Pack<T, V>;
  const int64_t per_row = n / V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t r = i / per_row, c = (i - r * per_row) * V;
    const P dy = load<T, V>(dout + r * ldd + c), g = load<T, V>(gate + r * ldg + c), u = load<T, V>(up + r * ldu + c);
    P dg, du;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float gv = to_f32(g.v[k]), dyv = to_f32(dy.v[k]);
      const float denom = 1.0f + expf(-gv);
      const float act = rounded<T>(gv / denom);
      const float sig = 1.0f / denom;
      const float ds = rounded<T>(__fmul_rn(dyv, to_f32(u.v[k])));
      du.v[k] = from_f32<T>(__fmul_rn(dyv, act));
      dg.v[k] = from_f32<T>(__fmul_rn(__fmul_rn(ds, sig), fmaf(gv, 1.0f - sig, 1.0f)));
    }
    store<T, V>(dgate + r * n + c, dg);
    store<T, V>(dup + r * n + c, du);
  }
}

bool aligned16(const TensorView& t) {
  return reinterpret_cast<uintptr_t>(t.data) % 16 == 0;
}

// Whether t's rows (stride strides[dim]) keep V-value accesses aligned; a single row needs no stride.
bool stride_ok(const TensorView& t, int dim, int v) {
  return t.shape[dim] <= 1 || t.strides[dim] % v == 0;
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

void rope_rotate_cuda(const TensorView& x, const TensorView& cos, const TensorView& sin, bool inverse,
                      const TensorView& out, int64_t stream) {
  const cuda::DeviceGuard guard(x);
  const int64_t rows = x.shape[0];
  const int heads = static_cast<int>(x.shape[1]), d = static_cast<int>(x.shape[2]);
  const int rot = static_cast<int>(cos.shape[1]);
  cuda::with_float_type(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = (rot / 2) % kVec == 0 && d % kVec == 0 && aligned16(x) && aligned16(cos) && aligned16(sin) &&
                     aligned16(out) && stride_ok(x, 0, kVec) && stride_ok(x, 1, kVec) && stride_ok(cos, 0, kVec) &&
                     stride_ok(sin, 0, kVec);
    const int v = vec ? kVec : 1;
    const int chunks = rot / 2 / v + (d - rot) / v;
    const int lanes = std::min(chunks, kRotateThreads);
    const int groups = std::min((heads + kRotateHeadsPer - 1) / kRotateHeadsPer, kRotateThreads / lanes);
    const int per_block = std::max(1, kRotateThreads / (lanes * groups));
    const RotateArgs args{x.data,         cos.data, sin.data, out.data, x.strides[0], x.strides[1], cos.strides[0],
                          sin.strides[0], rows,     heads,    d,        rot,          lanes,        groups,
                          per_block,      inverse};
    const auto blocks = static_cast<unsigned>((rows + per_block - 1) / per_block);
    const int threads = lanes * groups * per_block;
    if (vec)
      rope_rotate_kernel<T, kVec><<<blocks, threads, 0, cuda::as_stream(stream)>>>(args);
    else
      rope_rotate_kernel<T, 1><<<blocks, threads, 0, cuda::as_stream(stream)>>>(args);
  });
  cuda::check_launch("rope_rotate_kernel");
}

void silu_mul_backward_cuda(const TensorView& dout, const TensorView& gate, const TensorView& up,
                            const TensorView& dgate, const TensorView& dup, int64_t stream) {
  const cuda::DeviceGuard guard(gate);
  const int64_t n = gate.shape[1];
  cuda::with_float_type(gate.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = n % kVec == 0 && aligned16(dout) && aligned16(gate) && aligned16(up) && aligned16(dgate) &&
                     aligned16(dup) && stride_ok(dout, 0, kVec) && stride_ok(gate, 0, kVec) && stride_ok(up, 0, kVec);
    const int64_t total = dgate.numel() / (vec ? kVec : 1);
    const int64_t blocks =
        std::min<int64_t>((total + kEltThreads - 1) / kEltThreads, static_cast<int64_t>(sm_count()) * 8);
    const auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(blocks), kEltThreads, 0, cuda::as_stream(stream)>>>(
          dout.ptr<const T>(), dout.strides[0], gate.ptr<const T>(), gate.strides[0], up.ptr<const T>(), up.strides[0],
          dgate.ptr<T>(), dup.ptr<T>(), n, total);
    };
    if (vec)
      launch(silu_mul_backward_kernel<T, kVec>);
    else
      launch(silu_mul_backward_kernel<T, 1>);
  });
  cuda::check_launch("silu_mul_backward_kernel");
}

}  // namespace kindred
