// CUDA steps of the chunked linear cross-entropy (kindred/loss.h): everything between the cuBLAS GEMMs that
// python/kindred/_ops_loss.py issues. One thread block per row of a [T, C] f32 logits chunk; no host sync, no
// atomics (each row is owned by one block), deterministic. Same semantics as the CPU twins in
// csrc/cpu/loss_cpu.cpp. Outputs written in place over the logits chunk (exp-weights, gradients) are written
// tile by tile after a barrier, so a narrower element (bf16/f16) never overwrites a logit not yet read.
// Test: pytest -m gpu tests/test_loss.py
#include <climits>

#include "../common.cuh"
#include "kindred/loss.h"

namespace kindred {
namespace {

using cuda::from_f32;
using cuda::to_f32;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

struct Cap {
  float c;
  __device__ __forceinline__ float z(float r) const { return c > 0.0f ? c * tanhf(r / c) : r; }
  __device__ __forceinline__ float dz(float z) const { return c > 0.0f ? 1.0f - (z / c) * (z / c) : 1.0f; }
};

struct Opts {
  int ignore_index;
  float eps, lambda;
  Cap cap;
};

Opts opts(const LceOptions& o) {
  return Opts{static_cast<int>(o.ignore_index), static_cast<float>(o.label_smoothing), static_cast<float>(o.z_loss),
              Cap{static_cast<float>(o.softcap)}};
}

// Block-wide reductions through one shared slot per warp; every thread gets the result.
__device__ float block_sum(float v, float* smem) {
  v = cuda::warp_sum(v);
  __syncthreads();
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
  __syncthreads();
  float r = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) r += smem[w];
  return r;
}

__device__ float block_max(float v, float* smem) {
  v = cuda::warp_max(v);
  __syncthreads();
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
  __syncthreads();
  float r = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) r = fmaxf(r, smem[w]);
  return r;
}

// Max value with its smallest index (first occurrence, as torch.argmax).
__device__ __forceinline__ void arg_merge(float& v, int& i, float v2, int i2) {
  if (v2 > v || (v2 == v && i2 < i)) v = v2, i = i2;
}

__device__ void block_argmax(float& v, int& i, float* smem_v, int* smem_i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    arg_merge(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
  __syncthreads();
  if (threadIdx.x % 32 == 0) smem_v[threadIdx.x / 32] = v, smem_i[threadIdx.x / 32] = i;
  __syncthreads();
  v = smem_v[0], i = smem_i[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) arg_merge(v, i, smem_v[w], smem_i[w]);
}

template <typename B>
__device__ __forceinline__ float bias_at(const B* b, int64_t v) {
  return b ? to_f32(b[v]) : 0.0f;
}

// Updates the running state of row blockIdx.x with its chunk. One read of the row without the single pass
// (each thread keeps an online max and sum of its columns, merged at the end); with it, a second read writes
// e^{z − ref}·dz/dr over the row and sums e^{z − ref} (one expf per element), rescaled to the new max after.
template <typename B, typename E, bool kSingle>
__global__ void __launch_bounds__(kThreads)
    chunk_update_kernel(const float* logits, int64_t ld, const B* __restrict__ bias, const int* __restrict__ targets,
                        int64_t col0, int64_t c, Opts o, float margin, float* __restrict__ state,
                        int* __restrict__ argmax, E* exp_out, int64_t ld_exp, float* __restrict__ acc, int64_t d) {
  __shared__ float smem[kWarps];
  __shared__ int smem_i[kWarps];
  __shared__ float zy_shared;
  const int64_t row = blockIdx.x;
  const float* l = logits + row * ld;
  float* st = state + row * kLceStateCols;
  const int y = targets[row];
  const int64_t yl = (y != o.ignore_index && y >= col0 && y < col0 + c) ? y - col0 : -1;
  float tmax = -INFINITY, tsum = 0.0f, sumz = 0.0f, rbest = -INFINITY;
  int ibest = INT_MAX;
  for (int64_t v = threadIdx.x; v < c; v += kThreads) {
    const float r = l[v] + bias_at(bias, v), z = o.cap.z(r);
    if (kSingle) {
      tmax = fmaxf(tmax, z);
    } else if (z > tmax) {
      tsum = tsum * expf(tmax - z) + 1.0f;
      tmax = z;
    } else if (tmax > -INFINITY || z != z) {  // z = tmax = −∞ adds nothing; a NaN logit propagates
      tsum += expf(z - tmax);
    }
    sumz += z;
    if (r > rbest) rbest = r, ibest = static_cast<int>(v);
    if (v == yl) zy_shared = z;
  }
  const float cmax = block_max(tmax, smem);
  sumz = block_sum(sumz, smem);
  block_argmax(rbest, ibest, smem, smem_i);
  const float m_old = st[kLceMax], m_new = fmaxf(m_old, cmax);
  float ref = st[kLceRef], sum = 0.0f;
  if (kSingle) {
    if (ref == -INFINITY) {
      ref = m_new;
    } else if (m_new > ref + margin) {
      const float f = expf(ref - m_new);
      for (int64_t k = threadIdx.x; k < d; k += kThreads) acc[row * d + k] *= f;
      ref = m_new;
    }
    E* e = exp_out + row * ld_exp;
    for (int64_t base = 0; base < c; base += kThreads) {
      const int64_t v = base + threadIdx.x;
      const float z = v < c ? o.cap.z(l[v] + bias_at(bias, v)) : -INFINITY, x = v < c ? expf(z - ref) : 0.0f;
      sum += x;
      __syncthreads();  // the whole tile is read before any narrower write lands on it
      if (v < c) e[v] = from_f32<E>(x * o.cap.dz(z));
    }
    sum = block_sum(sum, smem) * expf(ref - m_new);  // m_new − ref ≤ margin: no overflow above
  } else {
    sum = block_sum(tsum == 0.0f ? 0.0f : tsum * expf(tmax - m_new), smem);  // 0: no column (or all −∞)
  }
  if (threadIdx.x == 0) {
    if (rbest > st[kLceRMax]) st[kLceRMax] = rbest, argmax[row] = static_cast<int>(col0 + ibest);
    st[kLceSum] = st[kLceSum] * expf(m_old - m_new) + sum;
    st[kLceMax] = m_new;
    st[kLceSumZ] += sumz;
    if (yl >= 0) st[kLceZy] = zy_shared;
    if (kSingle) st[kLceRef] = ref;
  }
}

// Overwrites row blockIdx.x of the chunk with coef·∂loss/∂r in G's dtype.
template <typename B, typename G>
__global__ void __launch_bounds__(kThreads)
    chunk_grad_kernel(const float* logits, int64_t ld, const B* __restrict__ bias, const int* __restrict__ targets,
                      int64_t col0, int64_t c, int64_t vocab, Opts o, const float* __restrict__ lse_v,
                      const float* __restrict__ coef_v, G* grad, int64_t ld_grad) {
  const int64_t row = blockIdx.x;
  const float* l = logits + row * ld;
  G* g = grad + row * ld_grad;
  const int y = targets[row];
  if (y == o.ignore_index) {
    // Nothing is read: rows are written only by their own block.
    for (int64_t v = threadIdx.x; v < c; v += kThreads) g[v] = from_f32<G>(0.0f);
    return;
  }
  const int64_t yl = (y >= col0 && y < col0 + c) ? y - col0 : -1;
  const float lse = lse_v[row], coef = coef_v[row];
  const float pscale = 1.0f + 2.0f * o.lambda * lse, smooth = o.eps / static_cast<float>(vocab);
  for (int64_t base = 0; base < c; base += kThreads) {
    const int64_t v = base + threadIdx.x;
    float out = 0.0f;
    if (v < c) {
      const float z = o.cap.z(l[v] + bias_at(bias, v));
      out = coef * (expf(z - lse) * pscale - (v == yl ? 1.0f - o.eps : 0.0f) - smooth) * o.cap.dz(z);
    }
    __syncthreads();
    if (v < c) g[v] = from_f32<G>(out);
  }
}

// Per row: lse, loss, hit; single pass: d_hidden from the accumulator, then zeroes it.
template <typename W, bool kSingle>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const float* __restrict__ state, const int* __restrict__ argmax, const int* __restrict__ targets,
                    int64_t vocab, Opts o, float* __restrict__ loss, float* __restrict__ lse_out,
                    uint8_t* __restrict__ hit, float* __restrict__ acc, const W* __restrict__ weight,
                    const float* __restrict__ wsum, const float* __restrict__ scale_p, W* __restrict__ d_hidden,
                    int64_t d) {
  const int64_t row = blockIdx.x;
  const float* s = state + row * kLceStateCols;
  const int y = targets[row];
  const bool ignored = y == o.ignore_index, in_range = y >= 0 && y < vocab;
  const float l = s[kLceMax] + logf(s[kLceSum]), zy = s[kLceZy];
  if (threadIdx.x == 0) {
    const float nv = static_cast<float>(vocab);
    const float value = l - (1.0f - o.eps) * zy - o.eps / nv * s[kLceSumZ] + o.lambda * l * l;
    lse_out[row] = ignored ? 0.0f : l;
    loss[row] = ignored ? 0.0f : in_range ? value : NAN;
    hit[row] = !ignored && argmax[row] == y;
  }
  if (!kSingle) return;
  const float scale = scale_p[0];
  const float f = scale * (1.0f + 2.0f * o.lambda * l) * expf(s[kLceRef] - l);
  const float ft = scale * (1.0f - o.eps) * o.cap.dz(zy), fs = scale * o.eps / static_cast<float>(vocab);
  const W* wy = in_range ? weight + static_cast<int64_t>(y) * d : nullptr;
  float* a = acc + row * d;
  W* dh = d_hidden + row * d;
  for (int64_t k = threadIdx.x; k < d; k += kThreads) {
    const float g = f * a[k] - (wy ? ft * to_f32(wy[k]) : NAN) - (wsum ? fs * wsum[k] : 0.0f);
    dh[k] = from_f32<W>(ignored ? 0.0f : g);
    a[k] = 0.0f;
  }
}

// Calls fn(B{}) with the CUDA type of the bias (float when there is none: the pointer is then null).
template <typename Fn>
void with_bias_type(const std::optional<TensorView>& bias, Fn&& fn) {
  if (!bias) return fn(float{});
  cuda::with_float_type(bias->dtype, fn);
}

template <typename B>
const B* bias_ptr(const std::optional<TensorView>& bias) {
  return bias ? bias->ptr<const B>() : nullptr;
}

}  // namespace

void lce_chunk_update_cuda(const TensorView& logits, const std::optional<TensorView>& bias, const TensorView& targets,
                           int64_t col0, int64_t vocab, const LceOptions& opt, const TensorView& state,
                           const TensorView& argmax, const std::optional<TensorView>& exp_out,
                           const std::optional<TensorView>& acc, int64_t stream) {
  (void)vocab;
  const int64_t t = logits.shape[0], c = logits.shape[1];
  if (t == 0 || c == 0) return;
  cuda::DeviceGuard guard(logits);
  const cudaStream_t st = cuda::as_stream(stream);
  const Opts o = opts(opt);
  with_bias_type(bias, [&](auto btag) {
    using B = decltype(btag);
    if (!exp_out) {
      chunk_update_kernel<B, float, false>
          <<<t, kThreads, 0, st>>>(logits.ptr<float>(), logits.strides[0], bias_ptr<B>(bias), targets.ptr<int>(), col0,
                                   c, o, kLceMargin, state.ptr<float>(), argmax.ptr<int>(), nullptr, 0, nullptr, 0);
      return;
    }
    const float margin = exp_out->dtype == DType::f16 ? kLceMarginF16 : kLceMargin;
    cuda::with_float_type(exp_out->dtype, [&](auto etag) {
      using E = decltype(etag);
      chunk_update_kernel<B, E, true><<<t, kThreads, 0, st>>>(logits.ptr<float>(), logits.strides[0], bias_ptr<B>(bias),
                                                              targets.ptr<int>(), col0, c, o, margin,
                                                              state.ptr<float>(), argmax.ptr<int>(), exp_out->ptr<E>(),
                                                              exp_out->strides[0], acc->ptr<float>(), acc->shape[1]);
    });
  });
  cuda::check_launch("chunk_update_kernel");
}

void lce_chunk_grad_cuda(const TensorView& logits, const std::optional<TensorView>& bias, const TensorView& targets,
                         int64_t col0, int64_t vocab, const LceOptions& opt, const TensorView& lse,
                         const TensorView& coef, const TensorView& grad_out, int64_t stream) {
  const int64_t t = logits.shape[0], c = logits.shape[1];
  if (t == 0 || c == 0) return;
  cuda::DeviceGuard guard(logits);
  const Opts o = opts(opt);
  with_bias_type(bias, [&](auto btag) {
    using B = decltype(btag);
    cuda::with_float_type(grad_out.dtype, [&](auto gtag) {
      using G = decltype(gtag);
      chunk_grad_kernel<B, G><<<t, kThreads, 0, cuda::as_stream(stream)>>>(
          logits.ptr<float>(), logits.strides[0], bias_ptr<B>(bias), targets.ptr<int>(), col0, c, vocab, o,
          lse.ptr<float>(), coef.ptr<float>(), grad_out.ptr<G>(), grad_out.strides[0]);
    });
  });
  cuda::check_launch("chunk_grad_kernel");
}

void lce_finalize_cuda(const TensorView& state, const TensorView& argmax, const TensorView& targets, int64_t vocab,
                       const LceOptions& opt, const TensorView& loss, const TensorView& lse, const TensorView& hit,
                       const std::optional<TensorView>& acc, const std::optional<TensorView>& weight,
                       const std::optional<TensorView>& wsum, const std::optional<TensorView>& scale,
                       const std::optional<TensorView>& d_hidden, int64_t stream) {
  const int64_t t = state.shape[0];
  if (t == 0) return;
  cuda::DeviceGuard guard(state);
  const cudaStream_t st = cuda::as_stream(stream);
  const Opts o = opts(opt);
  if (!acc) {
    finalize_kernel<float, false>
        <<<t, kThreads, 0, st>>>(state.ptr<float>(), argmax.ptr<int>(), targets.ptr<int>(), vocab, o, loss.ptr<float>(),
                                 lse.ptr<float>(), hit.ptr<uint8_t>(), nullptr, nullptr, nullptr, nullptr, nullptr, 0);
  } else {
    cuda::with_float_type(weight->dtype, [&](auto wtag) {
      using W = decltype(wtag);
      finalize_kernel<W, true><<<t, kThreads, 0, st>>>(
          state.ptr<float>(), argmax.ptr<int>(), targets.ptr<int>(), vocab, o, loss.ptr<float>(), lse.ptr<float>(),
          hit.ptr<uint8_t>(), acc->ptr<float>(), weight->ptr<W>(), wsum ? wsum->ptr<float>() : nullptr,
          scale->ptr<float>(), d_hidden->ptr<W>(), acc->shape[1]);
    });
  }
  cuda::check_launch("finalize_kernel");
}

}  // namespace kindred
