// The fused op family: the small per-layer steps of a decode forward, one launch each instead of several
// (python/kindred/models/decoder.py, DecoderLayer.forward_decode), and two of the training step's, forward
// and backward (python/kindred/_ops/fused.py: rope, swiglu). Each rounds to the activations' dtype T at
// exactly the points where the unfused torch ops (and their eager autograd) round, so only reductions may
// differ (in their order):
// - add_rms_norm: s = T(x + residual); out = T(s · rsqrt(mean(s²) + eps) · w), residual_out = s.
// - silu_mul: out = T(T(silu(gate)) · up).
// - rope_qk_cache: per row b of one decode step, q/k RMSNorm per head (optional, as add_rms_norm without the
//   add), then rotary on the first `rot` features in the rotate-half layout:
//   y_i = T(T(x_i · cos_i) + T(r_i · sin_i)), r = (−x[rot/2:rot], x[0:rot/2]); the rest passes through.
//   q goes to q_out [B, H, D]; k and v go into the cache [rows, Hkv, capacity, D] at row b, slot slots[b].
// - rope_rotate: that rotary alone over [rows, heads, D] (half = rot/2), or with `inverse` its transpose (for
//   any tables, not only a rotation by −θ), the gradient eager autograd gives: for i < half
//   y_i = T(T(x_i · cos_i) + T(x_{i+half} · sin_{i+half})), for half <= i < rot
//   y_i = T(T(x_i · cos_i) + T(−x_{i−half} · sin_{i−half})); the rest passes through.
// - silu_mul_backward: silu_mul's eager autograd. With s = T(g / (1 + exp(−g))), σ = 1 / (1 + exp(−g)) and
//   ds = T(dout · up): dup = T(dout · s), dgate = T(ds · σ · fma(g, 1 − σ, 1)), multiplied left to right
//   (torch's silu_backward, whose 1 + g · (1 − σ) its compiled CPU and CUDA kernels contract to one fma).
// CPU: the reference of each (csrc/cpu/fused_cpu.cpp, f32 / f16 / bf16 / f64); CUDA: one kernel each
// (kernels/fused/fused_cuda.cu, f32 / f16 / bf16). All buffers are allocated by the caller.
#pragma once

#include <optional>

#include "kindred/common.h"

namespace kindred {

inline constexpr int64_t kAddRmsNormMaxCudaFeatures = 16384;  // D the CUDA kernel takes (1024 threads x 16)
inline constexpr int64_t kRopeMaxCudaHeadDim = 512;           // D the CUDA rotary kernels take

// x, residual [M, D] with unit column stride (rows may be strided), w [D]; out, residual_out [M, D]
// contiguous (residual_out may be residual itself).
void add_rms_norm(const TensorView& x, const TensorView& residual, const TensorView& w, double eps,
                  const TensorView& out, const TensorView& residual_out, int64_t stream);
void add_rms_norm_cpu(const TensorView& x, const TensorView& residual, const TensorView& w, double eps,
                      const TensorView& out, const TensorView& residual_out);
void add_rms_norm_cuda(const TensorView& x, const TensorView& residual, const TensorView& w, double eps,
                       const TensorView& out, const TensorView& residual_out, int64_t stream);

// gate, up [M, I] with unit column stride (e.g. two column ranges of one fused GEMV output); out [M, I].
void silu_mul(const TensorView& gate, const TensorView& up, const TensorView& out, int64_t stream);
void silu_mul_cpu(const TensorView& gate, const TensorView& up, const TensorView& out);
void silu_mul_cuda(const TensorView& gate, const TensorView& up, const TensorView& out, int64_t stream);

// q [B, H·D], k and v [B, Hkv·D] with unit column stride; q_norm, k_norm [D] or absent (both or neither);
// cos, sin [B, rot] (rot even, <= D); cache_k, cache_v contiguous [rows >= B, Hkv, capacity, D]; slots i64 [B]
// in [0, capacity); q_out contiguous [B, H, D].
struct RopeQkCache {
  TensorView q, k, v;
  std::optional<TensorView> q_norm, k_norm;
  double eps = 1e-6;
  TensorView cos, sin, cache_k, cache_v, slots, q_out;
};
void rope_qk_cache(const RopeQkCache& a, int64_t stream);
void rope_qk_cache_cpu(const RopeQkCache& a);
void rope_qk_cache_cuda(const RopeQkCache& a, int64_t stream);

// x [rows, heads, D] with unit stride on D (any on rows and heads, e.g. q as a view of a [rows, H·D] GEMM
// output); cos, sin [rows, rot] with unit column stride (rot even, 0 < rot <= D); out contiguous
// [rows, heads, D].
void rope_rotate(const TensorView& x, const TensorView& cos, const TensorView& sin, bool inverse, const TensorView& out,
                 int64_t stream);
void rope_rotate_cpu(const TensorView& x, const TensorView& cos, const TensorView& sin, bool inverse,
                     const TensorView& out);
void rope_rotate_cuda(const TensorView& x, const TensorView& cos, const TensorView& sin, bool inverse,
                      const TensorView& out, int64_t stream);

// dout, gate, up [M, I] with unit column stride (rows may be strided); dgate, dup contiguous [M, I].
void silu_mul_backward(const TensorView& dout, const TensorView& gate, const TensorView& up, const TensorView& dgate,
                       const TensorView& dup, int64_t stream);
void silu_mul_backward_cpu(const TensorView& dout, const TensorView& gate, const TensorView& up,
                           const TensorView& dgate, const TensorView& dup);
void silu_mul_backward_cuda(const TensorView& dout, const TensorView& gate, const TensorView& up,
                            const TensorView& dgate, const TensorView& dup, int64_t stream);

}  // namespace kindred
