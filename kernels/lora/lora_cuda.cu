// CUDA kernel of the lora family: lora_dropout, out = drop(x) or out += drop(x), with the counter-hash mask
// of kindred/lora.h (bit-exact with csrc/cpu/lora_cpu.cpp: same mask, one float multiply by the same
// 1 / (1 − p), one rounding). The LoRA GEMMs themselves are cuBLAS calls made through torch
// (python/kindred/_ops_lora.py). Arguments were validated in csrc/lora.cpp.
// Test: pytest -m gpu tests/test_lora.py
#include "../common.cuh"
#include "kindred/lora.h"

namespace kindred {
namespace {

using cuda::from_f32;
using cuda::to_f32;

constexpr int kThreads = 256;

// The seed is read on the device (no host sync): int32 [2], low word first.
template <typename T>
__global__ void lora_dropout_kernel(const T* __restrict__ x, int64_t ldx, T* __restrict__ out, int64_t ldo,
                                    int64_t cols, int64_t n, const int32_t* __restrict__ seed_words, uint64_t threshold,
                                    float inv, bool active, bool accumulate) {
  const uint64_t seed = active ? (static_cast<uint64_t>(static_cast<uint32_t>(seed_words[0])) |
                                  static_cast<uint64_t>(static_cast<uint32_t>(seed_words[1])) << 32)
                               : 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t row = i / cols, col = i - row * cols;
    const float xv = to_f32(x[row * ldx + col]);
    float v = xv;
    if (active) v = lora_keep(seed, static_cast<uint64_t>(i), threshold) ? __fmul_rn(xv, inv) : 0.0f;
    T& o = out[row * ldo + col];
    o = from_f32<T>(accumulate ? __fadd_rn(to_f32(o), v) : v);
  }
}

}  // namespace

void lora_dropout_cuda(const TensorView& x, const LoraDropout& dropout, const TensorView& out, bool accumulate,
                       int64_t stream) {
  const cuda::DeviceGuard guard(x);
  const int64_t n = x.numel();
  if (n == 0) return;
  int sms = 0, device = 0;
  cuda::check(cudaGetDevice(&device), "cudaGetDevice");
  cuda::check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, static_cast<int64_t>(sms) * 16);
  const int32_t* seed = dropout.active() ? dropout.seed->ptr<const int32_t>() : nullptr;
  const uint64_t threshold = lora_dropout_threshold(dropout.p);
  const float inv = static_cast<float>(1.0 / (1.0 - dropout.p));
  cuda::with_float_type(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    lora_dropout_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, cuda::as_stream(stream)>>>(
        x.ptr<const T>(), x.strides[0], out.ptr<T>(), out.strides[0], x.shape[1], n, seed, threshold, inv,
        dropout.active(), accumulate);
  });
  cuda::check_launch("lora_dropout_kernel");
}

}  // namespace kindred
