// The norm op family: the training step's RMSNorm, forward and backward (python/kindred/_ops/norm.py holds its
// autograd), over rows [M, D] in the activations' dtype T with the arithmetic in float (double for f64 on the
// CPU) and one rounding to T per output:
// - rms_norm: r = 1 / sqrt(mean(float(x)²) + eps), out_i = T(float(x_i) · r · (offset + float(w_i))); rstd = r.
//   offset 0 is the Llama / Qwen scale w, offset 1 Gemma's (1 + w). This is F.rms_norm(x, (D,), w, eps) and
//   F.rms_norm(x.float(), (D,), 1 + w.float(), eps).type_as(x) up to the order of the sum of squares and the
//   last bit of the rsqrt, without the float32 copies of the second.
// - rms_norm_backward: with gw = float(dout) · (offset + float(w)) and x̂ = float(x) · r,
//   dx = T(r · (gw − x̂ · mean(x̂ · gw))). No weight gradient (kindred's LoRA training freezes the norms; the
//   Python side computes one with torch ops when w requires grad).
// w is in T or float32 (Gemma's weights may be kept in either). CPU: the reference (csrc/cpu/norm_cpu.cpp,
// f32 / f16 / bf16 / f64); CUDA: one kernel each (kernels/norm/norm_cuda.cu, f32 / f16 / bf16), a warp or half
// a warp per row for short rows, a block per row for long ones, the row in registers. All buffers are
// allocated by the caller.
#pragma once

#include "kindred/common.h"

namespace kindred {

inline constexpr int64_t kRmsNormMaxCudaFeatures = 16384;  // D the CUDA kernels take (1024 threads x 16)

// x [M, D] with unit column stride and a row stride >= D (a column range of a wider buffer); w [D] in x's dtype
// or float32; offset 0 or 1; out [M, D] contiguous in x's dtype; rstd [M] float32 (float64 for float64 x).
void rms_norm(const TensorView& x, const TensorView& w, double eps, double offset, const TensorView& out,
              const TensorView& rstd, int64_t stream);
void rms_norm_cpu(const TensorView& x, const TensorView& w, double eps, double offset, const TensorView& out,
                  const TensorView& rstd);
void rms_norm_cuda(const TensorView& x, const TensorView& w, double eps, double offset, const TensorView& out,
                   const TensorView& rstd, int64_t stream);

// dout and x [M, D] with unit column stride (rows may be strided), w and offset as the forward's, rstd [M] the
// forward's; dx [M, D] contiguous in x's dtype.
void rms_norm_backward(const TensorView& dout, const TensorView& x, const TensorView& w, const TensorView& rstd,
                       double offset, const TensorView& dx, int64_t stream);
void rms_norm_backward_cpu(const TensorView& dout, const TensorView& x, const TensorView& w, const TensorView& rstd,
                           double offset, const TensorView& dx);
void rms_norm_backward_cuda(const TensorView& dout, const TensorView& x, const TensorView& w, const TensorView& rstd,
                            double offset, const TensorView& dx, int64_t stream);

}  // namespace kindred
