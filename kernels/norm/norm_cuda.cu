// CUDA kernels of the norm family (semantics: kindred/norm.h): the same float arithmetic and rounding as
// csrc/cpu/norm_cpu.cpp, except the order of the row sums (a shuffle / block tree here) and fma contraction.
// Memory-bound: every row is read once into registers, 16-byte loads and stores where the row is aligned, and
// written once. Short rows (D <= 512, e.g. per-head q/k norms): half a warp or a warp per row, several rows per
// block; long rows (hidden norms): one block per row. Arguments were validated in csrc/norm.cpp.
// Test: pytest -m gpu tests/test_norm_gpu.py
#include <algorithm>

#include "../common.cuh"
#include "kindred/norm.h"

namespace kindred {
namespace {

using cuda::from_f32;
using cuda::to_f32;

constexpr int kElems = 16;         // row values per thread at most
constexpr int kRowsThreads = 256;  // block of the group-per-row kernels
constexpr int kMaxThreads = 1024;  // block of the block-per-row kernel at most
static_assert(kMaxThreads * kElems == kRmsNormMaxCudaFeatures, "the row limit csrc/norm.cpp checks");

struct NormArgs {
  const void* x = nullptr;
  int64_t ldx = 0;
  const void* dout = nullptr;  // backward only
  int64_t ldd = 0;
  const void* w = nullptr;
  void* out = nullptr;   // out (forward) or dx (backward): contiguous rows of d
  void* rstd = nullptr;  // float [rows]: written by the forward, read by the backward
  int64_t rows = 0;
  int d = 0;
  float eps = 0.0f, offset = 0.0f;  // eps: forward only
};

NormArgs args_of(const TensorView& x, const TensorView& w, const TensorView& out, const TensorView& rstd,
                 double offset) {
  NormArgs a;
  a.x = x.data;
  a.ldx = x.strides[0];
  a.w = w.data;
  a.out = out.data;
  a.rstd = rstd.data;
  a.rows = x.shape[0];
  a.d = static_cast<int>(x.shape[1]);
  a.offset = static_cast<float>(offset);
  return a;
}

// kN values of U, loaded and stored whole: in 16-byte accesses when they fill whole ones (then 16-byte
// aligned). Rows stay in registers in their own dtype and are converted to float where used.
template <typename U, int kN>
struct alignas((kN * sizeof(U)) % 16 == 0 ? 16 : sizeof(U)) Pack {
  U v[kN];
};

template <typename U, int kN>
__device__ __forceinline__ Pack<U, kN> load(const U* p) {
  return *reinterpret_cast<const Pack<U, kN>*>(p);
}

// The sum of v over a row's threads: a group of kGroup lanes (kGroup <= 32) or, kGroup = 0, the whole block
// (blockDim.x a multiple of 32; every warp reduces the warps' partials itself: no second barrier).
template <int kGroup>
__device__ __forceinline__ float row_sum(float v) {
  if constexpr (kGroup > 0) {
#pragma unroll
    for (int o = kGroup / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
  } else {
    __shared__ float partial[kMaxThreads / 32];
    v = cuda::warp_sum(v);
    const int lane = threadIdx.x % 32;
    if (lane == 0) partial[threadIdx.x / 32] = v;
    __syncthreads();
    return cuda::warp_sum(lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : 0.0f);
  }
}

// A thread's place: one row per group of kGroup lanes (kGroup > 0: kRowsThreads / kGroup rows per block) or per
// block (kGroup = 0); its units of kVec consecutive values are unit j at (j · threads + lane) · kVec.
template <int kGroup>
struct Slot {
  int threads = kGroup > 0 ? kGroup : static_cast<int>(blockDim.x);
  int lane = kGroup > 0 ? static_cast<int>(threadIdx.x) % kGroup : static_cast<int>(threadIdx.x);
  int64_t row = kGroup > 0 ? static_cast<int64_t>(blockIdx.x) * (kRowsThreads / kGroup) + threadIdx.x / kGroup
                           : static_cast<int64_t>(blockIdx.x);
  __device__ int at(int j, int vec) const { return (j * threads + lane) * vec; }
};

// out = T(x · r · (offset + w)), rstd = r; x and w stay in registers in their own dtype until the output.
// A group past the last row (valid false) still joins its warp's shuffles.
template <typename T, typename W, int kVec, int kGroup, int kPer>
__global__ void __launch_bounds__(kGroup > 0 ? kRowsThreads : kMaxThreads) rms_norm_kernel(NormArgs a) {
  const Slot<kGroup> s;
  const bool valid = s.row < a.rows;
  const T* x = static_cast<const T*>(a.x) + s.row * a.ldx;
  Pack<T, kVec> xp[kPer];
  Pack<W, kVec> wp[kPer];
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int i = s.at(j, kVec);
    if (valid && i < a.d) {
      xp[j] = load<T, kVec>(x + i);
      wp[j] = load<W, kVec>(static_cast<const W*>(a.w) + i);
    }
  }
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    if (valid && s.at(j, kVec) < a.d) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) sum += to_f32(xp[j].v[k]) * to_f32(xp[j].v[k]);
    }
  }
  sum = row_sum<kGroup>(sum);
  if (!valid) return;
  const float r = 1.0f / sqrtf(sum / static_cast<float>(a.d) + a.eps);
  if (s.lane == 0) static_cast<float*>(a.rstd)[s.row] = r;
  T* out = static_cast<T*>(a.out) + s.row * a.d;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int i = s.at(j, kVec);
    if (i < a.d) {
      Pack<T, kVec> y;
#pragma unroll
      for (int k = 0; k < kVec; ++k) y.v[k] = from_f32<T>(to_f32(xp[j].v[k]) * r * (a.offset + to_f32(wp[j].v[k])));
      *reinterpret_cast<Pack<T, kVec>*>(out + i) = y;
    }
  }
}

// dx = T(r · (gw − x̂ · mean(x̂ · gw))) with gw = dout · (offset + w), x̂ = x · r formed as the CPU reference
// does, held as floats (fewer registers than the three inputs: more blocks per SM).
template <typename T, typename W, int kVec, int kGroup, int kPer>
__global__ void __launch_bounds__(kGroup > 0 ? kRowsThreads : kMaxThreads) rms_norm_backward_kernel(NormArgs a) {
  const Slot<kGroup> s;
  const bool valid = s.row < a.rows;
  const T* x = static_cast<const T*>(a.x) + s.row * a.ldx;
  const T* dout = static_cast<const T*>(a.dout) + s.row * a.ldd;
  const float r = valid ? static_cast<const float*>(a.rstd)[s.row] : 0.0f;
  float xh[kPer][kVec], gw[kPer][kVec];
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int i = s.at(j, kVec);
    if (valid && i < a.d) {
      const Pack<T, kVec> xv = load<T, kVec>(x + i), g = load<T, kVec>(dout + i);
      const Pack<W, kVec> wv = load<W, kVec>(static_cast<const W*>(a.w) + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        xh[j][k] = to_f32(xv.v[k]) * r;
        gw[j][k] = to_f32(g.v[k]) * (a.offset + to_f32(wv.v[k]));
        sum += xh[j][k] * gw[j][k];
      }
    }
  }
  sum = row_sum<kGroup>(sum);
  if (!valid) return;
  const float mean = sum / static_cast<float>(a.d);
  T* dx = static_cast<T*>(a.out) + s.row * a.d;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int i = s.at(j, kVec);
    if (i < a.d) {
      Pack<T, kVec> y;
#pragma unroll
      for (int k = 0; k < kVec; ++k) y.v[k] = from_f32<T>(r * (gw[j][k] - xh[j][k] * mean));
      *reinterpret_cast<Pack<T, kVec>*>(dx + i) = y;
    }
  }
}

template <typename T, typename W, int kVec, int kGroup, int kPer, bool kBackward>
void launch(const NormArgs& a, int block_threads, cudaStream_t stream) {
  const int64_t blocks = kGroup > 0 ? (a.rows + kRowsThreads / kGroup - 1) / (kRowsThreads / kGroup) : a.rows;
  const auto kernel =
      kBackward ? rms_norm_backward_kernel<T, W, kVec, kGroup, kPer> : rms_norm_kernel<T, W, kVec, kGroup, kPer>;
  const int threads = kGroup > 0 ? kRowsThreads : block_threads;
  kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(a);
}

// The kernel for rows of d values in units of kVec: half a warp or a warp per row (one unit each: the fewest
// registers, the most rows in flight), a warp per row (up to kElems values each), or a block of the fewest
// threads (a multiple of 64) that holds the row at kElems each.
template <typename T, typename W, int kVec, bool kBackward>
void launch_for(const NormArgs& a, cudaStream_t stream) {
  constexpr int kPer = kElems / kVec;
  if constexpr (kVec > 1) {
    if (a.d / kVec <= 16) return launch<T, W, kVec, 16, 1, kBackward>(a, 0, stream);
    if (a.d / kVec <= 32) return launch<T, W, kVec, 32, 1, kBackward>(a, 0, stream);
  }
  if (a.d <= 32 * kElems) return launch<T, W, kVec, 32, kPer, kBackward>(a, 0, stream);
  const int threads = std::min(kMaxThreads, (a.d + 64 * kElems - 1) / (64 * kElems) * 64);
  launch<T, W, kVec, 0, kPer, kBackward>(a, threads, stream);
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Dispatches on x's dtype T, w's (T or float) and whether every row is 16-byte aligned (then 16-byte units).
template <bool kBackward>
void run(const TensorView& x, const TensorView& w, NormArgs a, int64_t stream) {
  KINDRED_CHECK(a.rows <= (int64_t{1} << 31) - 1, "x's rows must be < 2^31 for the CUDA kernel, got ", x.describe());
  const cuda::DeviceGuard guard(x);
  cuda::with_float_type(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const bool rows_aligned =
        a.d % kVec == 0 && (a.rows <= 1 || a.ldx % kVec == 0) && (!kBackward || a.rows <= 1 || a.ldd % kVec == 0);
    const bool vec =
        rows_aligned && aligned16(a.x) && aligned16(a.w) && aligned16(a.out) && (!kBackward || aligned16(a.dout));
    auto go = [&](auto w_tag) {
      using W = decltype(w_tag);
      if (vec)
        launch_for<T, W, kVec, kBackward>(a, cuda::as_stream(stream));
      else
        launch_for<T, W, 1, kBackward>(a, cuda::as_stream(stream));
    };
    if constexpr (std::is_same_v<T, float>)
      go(float{});
    else if (w.dtype == DType::f32)
      go(float{});
    else
      go(T{});
  });
  cuda::check_launch(kBackward ? "rms_norm_backward_kernel" : "rms_norm_kernel");
}

}  // namespace

void rms_norm_cuda(const TensorView& x, const TensorView& w, double eps, double offset, const TensorView& out,
                   const TensorView& rstd, int64_t stream) {
  NormArgs a = args_of(x, w, out, rstd, offset);
  a.eps = static_cast<float>(eps);
  run<false>(x, w, a, stream);
}

void rms_norm_backward_cuda(const TensorView& dout, const TensorView& x, const TensorView& w, const TensorView& rstd,
                            double offset, const TensorView& dx, int64_t stream) {
  NormArgs a = args_of(x, w, dx, rstd, offset);
  a.dout = dout.data;
  a.ldd = dout.strides[0];
  run<true>(x, w, a, stream);
}

}  // namespace kindred
