// Validation and device dispatch of the fused family (declarations and semantics: kindred/fused.h).
#include "kindred/fused.h"

#include <cmath>

#include "kindred/dispatch.h"

namespace kindred {
namespace {

// Every tensor of one op shares the activations' dtype and device.
void check_like(const TensorView& t, const char* name, const TensorView& x, const char* x_name) {
  KINDRED_CHECK(t.dtype == x.dtype, name, " must have ", x_name, "'s dtype ", dtype_name(x.dtype), ", got ",
                t.describe());
  check_same_device(t, name, x, x_name);
}

// [rows, cols] with unit column stride and rows at least a row apart (a column range of a wider buffer).
void check_rows(const TensorView& t, const char* name, int64_t rows, int64_t cols) {
  KINDRED_CHECK(t.dim() == 2 && t.shape[0] == rows && t.shape[1] == cols && (cols <= 1 || t.strides[1] == 1) &&
                    (rows <= 1 || t.strides[0] >= cols),
                name, " must be [", rows, ", ", cols, "] with unit column stride and a row stride >= ", cols, ", got ",
                t.describe());
}

void check_exact(const TensorView& t, const char* name, const std::vector<int64_t>& shape) {
  check_shape(t, name, shape);
  check_contiguous(t, name);
}

void check_float(const TensorView& t, const char* name) {
  check_dtype(t, name, {DType::f32, DType::f64, DType::f16, DType::bf16});
  KINDRED_CHECK(t.device == Device::cpu || t.dtype != DType::f64, name,
                " on CUDA must be float32, float16 or bfloat16, got ", t.describe());
}

void check_eps(double eps) {
  KINDRED_CHECK(std::isfinite(eps) && eps > 0.0, "eps must be finite and > 0, got ", eps);
}

}  // namespace

void add_rms_norm(const TensorView& x, const TensorView& residual, const TensorView& w, double eps,
                  const TensorView& out, const TensorView& residual_out, int64_t stream) {
  check_float(x, "x");
  KINDRED_CHECK(x.dim() == 2 && x.shape[1] > 0, "x must be 2-D [rows, features], got ", x.describe());
  const int64_t m = x.shape[0], d = x.shape[1];
  check_rows(x, "x", m, d);
  check_like(residual, "residual", x, "x");
  check_rows(residual, "residual", m, d);
  check_like(w, "w", x, "x");
  check_exact(w, "w", {d});
  check_like(out, "out", x, "x");
  check_exact(out, "out", {m, d});
  check_like(residual_out, "residual_out", x, "x");
  check_exact(residual_out, "residual_out", {m, d});
  check_eps(eps);
  if (m == 0) return;
  if (x.device == Device::cpu) return add_rms_norm_cpu(x, residual, w, eps, out, residual_out);
  KINDRED_CHECK(d <= kAddRmsNormMaxCudaFeatures, "x's features must be <= ", kAddRmsNormMaxCudaFeatures,
                " for the CUDA kernel (one block holds a row in registers), got ", x.describe());
  KINDRED_CALL_CUDA(add_rms_norm, x, residual, w, eps, out, residual_out, stream);
}

void silu_mul(const TensorView& gate, const TensorView& up, const TensorView& out, int64_t stream) {
  check_float(gate, "gate");
  KINDRED_CHECK(gate.dim() == 2, "gate must be 2-D [rows, features], got ", gate.describe());
  const int64_t m = gate.shape[0], n = gate.shape[1];
  check_rows(gate, "gate", m, n);
  check_like(up, "up", gate, "gate");
  check_rows(up, "up", m, n);
  check_like(out, "out", gate, "gate");
  check_exact(out, "out", {m, n});
  if (m == 0 || n == 0) return;
  if (gate.device == Device::cpu) return silu_mul_cpu(gate, up, out);
  KINDRED_CALL_CUDA(silu_mul, gate, up, out, stream);
}

void rope_qk_cache(const RopeQkCache& a, int64_t stream) {
  check_float(a.cache_k, "cache_k");
  KINDRED_CHECK(a.cache_k.dim() == 4, "cache_k must be 4-D [rows, kv_heads, capacity, head_dim], got ",
                a.cache_k.describe());
  check_contiguous(a.cache_k, "cache_k");
  const int64_t rows = a.cache_k.shape[0], hkv = a.cache_k.shape[1], cap = a.cache_k.shape[2];
  const int64_t d = a.cache_k.shape[3];
  KINDRED_CHECK(hkv > 0 && cap > 0 && d > 0 && d % 2 == 0 && d <= 512,
                "cache_k's kv_heads and capacity must be > 0 and head_dim even and <= 512, got ", a.cache_k.describe());
  check_like(a.cache_v, "cache_v", a.cache_k, "cache_k");
  check_exact(a.cache_v, "cache_v", a.cache_k.shape);
  KINDRED_CHECK(a.q.dim() == 2 && a.q.shape[1] > 0 && a.q.shape[1] % d == 0,
                "q must be 2-D [batch, heads * head_dim] with head_dim = ", d, ", got ", a.q.describe());
  const int64_t b = a.q.shape[0], h = a.q.shape[1] / d;
  KINDRED_CHECK(b <= rows, "q has ", b, " rows but the cache only ", rows);
  KINDRED_CHECK(h % hkv == 0, "q's ", h, " heads must be a multiple of the cache's ", hkv, " kv heads");
  check_like(a.q, "q", a.cache_k, "cache_k");
  check_rows(a.q, "q", b, h * d);
  check_like(a.k, "k", a.cache_k, "cache_k");
  check_rows(a.k, "k", b, hkv * d);
  check_like(a.v, "v", a.cache_k, "cache_k");
  check_rows(a.v, "v", b, hkv * d);
  KINDRED_CHECK(a.q_norm.has_value() == a.k_norm.has_value(), "q_norm and k_norm must be given together");
  if (a.q_norm) {
    check_like(*a.q_norm, "q_norm", a.cache_k, "cache_k");
    check_exact(*a.q_norm, "q_norm", {d});
    check_like(*a.k_norm, "k_norm", a.cache_k, "cache_k");
    check_exact(*a.k_norm, "k_norm", {d});
    check_eps(a.eps);
  }
  KINDRED_CHECK(
      a.cos.dim() == 2 && a.cos.shape[0] == b && a.cos.shape[1] > 0 && a.cos.shape[1] % 2 == 0 && a.cos.shape[1] <= d,
      "cos must be [", b, ", rot] with rot even and <= head_dim ", d, ", got ", a.cos.describe());
  const int64_t rot = a.cos.shape[1];
  check_like(a.cos, "cos", a.cache_k, "cache_k");
  check_rows(a.cos, "cos", b, rot);
  check_like(a.sin, "sin", a.cache_k, "cache_k");
  check_rows(a.sin, "sin", b, rot);
  check_dtype(a.slots, "slots", {DType::i64});
  check_exact(a.slots, "slots", {b});
  check_same_device(a.slots, "slots", a.cache_k, "cache_k");
  check_like(a.q_out, "q_out", a.cache_k, "cache_k");
  check_exact(a.q_out, "q_out", {b, h, d});
  if (b == 0) return;
  if (a.cache_k.device == Device::cpu) return rope_qk_cache_cpu(a);
  // Slots are read on the device (no host sync); the kernel skips a slot outside [0, capacity).
  KINDRED_CALL_CUDA(rope_qk_cache, a, stream);
}

void rope_rotate(const TensorView& x, const TensorView& cos, const TensorView& sin, bool inverse, const TensorView& out,
                 int64_t stream) {
  check_float(x, "x");
  KINDRED_CHECK(x.dim() == 3 && x.shape[2] > 0 && (x.shape[2] == 1 || x.strides[2] == 1),
                "x must be 3-D [rows, heads, head_dim] with unit stride on head_dim, got ", x.describe());
  const int64_t rows = x.shape[0], heads = x.shape[1], d = x.shape[2];
  check_like(cos, "cos", x, "x");
  KINDRED_CHECK(
      cos.dim() == 2 && cos.shape[0] == rows && cos.shape[1] > 0 && cos.shape[1] % 2 == 0 && cos.shape[1] <= d,
      "cos must be [", rows, ", rot] with rot even, > 0 and <= head_dim ", d, ", got ", cos.describe());
  const int64_t rot = cos.shape[1];
  check_rows(cos, "cos", rows, rot);
  check_like(sin, "sin", x, "x");
  check_rows(sin, "sin", rows, rot);
  check_like(out, "out", x, "x");
  check_exact(out, "out", {rows, heads, d});
  if (rows == 0 || heads == 0) return;
  if (x.device == Device::cpu) return rope_rotate_cpu(x, cos, sin, inverse, out);
  KINDRED_CHECK(d <= kRopeMaxCudaHeadDim, "x's head_dim must be <= ", kRopeMaxCudaHeadDim, " for the CUDA kernel, got ",
                x.describe());
  KINDRED_CALL_CUDA(rope_rotate, x, cos, sin, inverse, out, stream);
}

void silu_mul_backward(const TensorView& dout, const TensorView& gate, const TensorView& up, const TensorView& dgate,
                       const TensorView& dup, int64_t stream) {
  check_float(gate, "gate");
  KINDRED_CHECK(gate.dim() == 2, "gate must be 2-D [rows, features], got ", gate.describe());
  const int64_t m = gate.shape[0], n = gate.shape[1];
  check_rows(gate, "gate", m, n);
  check_like(up, "up", gate, "gate");
  check_rows(up, "up", m, n);
  check_like(dout, "dout", gate, "gate");
  check_rows(dout, "dout", m, n);
  check_like(dgate, "dgate", gate, "gate");
  check_exact(dgate, "dgate", {m, n});
  check_like(dup, "dup", gate, "gate");
  check_exact(dup, "dup", {m, n});
  if (m == 0 || n == 0) return;
  if (gate.device == Device::cpu) return silu_mul_backward_cpu(dout, gate, up, dgate, dup);
  KINDRED_CALL_CUDA(silu_mul_backward, dout, gate, up, dgate, dup, stream);
}

}  // namespace kindred
