// Validation and device dispatch of the lora family (declarations and semantics: kindred/lora.h).
#include "kindred/lora.h"

#include <cmath>

#include "kindred/dispatch.h"

namespace kindred {
namespace {

void check_2d(const TensorView& t, const char* name, int64_t rows, int64_t cols, const char* what) {
  KINDRED_CHECK(t.dim() == 2 && t.shape[0] == rows && t.shape[1] == cols, name, " must have shape [", rows, ", ", cols,
                "] (", what, "), got ", t.describe());
}

// Every tensor of one op shares x's dtype and device.
void check_like(const TensorView& t, const char* name, const TensorView& x) {
  KINDRED_CHECK(t.dtype == x.dtype, name, " must have x's dtype ", dtype_name(x.dtype), ", got ", t.describe());
  check_same_device(t, name, x, "x");
}

void check_dropout(const LoraDropout& d, const TensorView& x) {
  KINDRED_CHECK(std::isfinite(d.p) && d.p >= 0.0 && d.p < 1.0, "dropout p must be in [0, 1), got ", d.p);
  if (!d.active()) return;
  KINDRED_CHECK(d.seed.has_value(), "dropout with p > 0 needs a seed (int32 [2])");
  check_dtype(*d.seed, "seed", {DType::i32});
  KINDRED_CHECK(d.seed->numel() == 2 && d.seed->contiguous(), "seed must be a contiguous int32 [2], got ",
                d.seed->describe());
  check_same_device(*d.seed, "seed", x, "x");
}

// x [M, K], w [N, K] (rows may be strided), a [r, K], b [N, r]; returns {M, K, N, r}.
struct Dims {
  int64_t m, k, n, r;
};

Dims check_operands(const TensorView& x, const TensorView& w, const TensorView& a, const TensorView& b) {
  check_dtype(x, "x", {DType::f32, DType::f64, DType::f16, DType::bf16});
  KINDRED_CHECK(x.dim() == 2 && x.shape[1] > 0, "x must be 2-D [tokens, in_features], got ", x.describe());
  check_contiguous(x, "x");
  KINDRED_CHECK(w.dim() == 2, "w (the base weight) must be 2-D [out_features, in_features], got ", w.describe());
  KINDRED_CHECK(a.dim() == 2, "a (lora_A) must be 2-D [r, in_features], got ", a.describe());
  const Dims d{x.shape[0], x.shape[1], w.shape[0], a.shape[0]};
  check_like(w, "w", x);
  KINDRED_CHECK(w.shape[1] == d.k && d.n > 0, "w must have shape [N, ", d.k, "] (x has in_features ", d.k, "), got ",
                w.describe());
  KINDRED_CHECK(w.strides[1] == 1 && w.strides[0] >= d.k, "w must have unit column stride and a row stride >= ", d.k,
                ", got strides [", w.strides[0], ", ", w.strides[1], "]");
  KINDRED_CHECK(d.r >= 1 && d.r <= std::min(d.k, d.n),
                "the LoRA rank r = a.shape[0] must be in [1, min(K, N) = ", std::min(d.k, d.n), "], got ", d.r);
  check_like(a, "a", x);
  check_2d(a, "a", d.r, d.k, "lora_A: [r, in_features]");
  check_contiguous(a, "a");
  check_like(b, "b", x);
  check_2d(b, "b", d.n, d.r, "lora_B: [out_features, r]");
  check_contiguous(b, "b");
  return d;
}

void check_out(const TensorView& t, const char* name, const TensorView& x, int64_t rows, int64_t cols,
               const char* what) {
  check_like(t, name, x);
  check_2d(t, name, rows, cols, what);
  check_contiguous(t, name);
}

// 2-D with unit column stride and rows at least a row apart (e.g. the first K columns of a wider buffer).
void check_rows(const TensorView& t, const char* name) {
  KINDRED_CHECK(t.dim() == 2 && t.strides[1] == 1 && t.strides[0] >= t.shape[1], name,
                " must be 2-D with unit column stride and a row stride >= its width, got ", t.describe());
}

constexpr const char* kReference =
    "lora_linear here is the CPU reference; on CUDA kindred.ops.lora_linear composes cuBLAS GEMMs with "
    "lora_dropout (python/kindred/_ops/lora.py)";

}  // namespace

void lora_dropout(const TensorView& x, const LoraDropout& dropout, const TensorView& out, bool accumulate,
                  [[maybe_unused]] int64_t stream) {
  check_dtype(x, "x", {DType::f32, DType::f64, DType::f16, DType::bf16});
  check_rows(x, "x");
  check_like(out, "out", x);
  KINDRED_CHECK(out.shape == x.shape, "out must have x's shape, got ", out.describe(), " for x ", x.describe());
  check_rows(out, "out");
  check_dropout(dropout, x);
  if (x.device == Device::cpu) return lora_dropout_cpu(x, dropout, out, accumulate);
  KINDRED_CHECK(x.dtype != DType::f64, "lora_dropout on CUDA takes float32, float16 or bfloat16, got ", x.describe());
  KINDRED_CALL_CUDA(lora_dropout, x, dropout, out, accumulate, stream);
}

void lora_linear(const TensorView& x, const TensorView& w, const TensorView& a, const TensorView& b,
                 const std::optional<TensorView>& bias, double scaling, const LoraDropout& dropout, const TensorView& y,
                 const TensorView& xs) {
  const Dims d = check_operands(x, w, a, b);
  KINDRED_CHECK(std::isfinite(scaling), "scaling must be finite, got ", scaling);
  if (bias) {
    check_like(*bias, "bias", x);
    KINDRED_CHECK(bias->dim() == 1 && bias->shape[0] == d.n && bias->contiguous(), "bias must be a contiguous [", d.n,
                  "], got ", bias->describe());
  }
  check_dropout(dropout, x);
  check_out(y, "y", x, d.m, d.n, "[tokens, out_features]");
  check_out(xs, "xs", x, d.m, d.r, "[tokens, r]");
  check_cpu(x, "x", kReference);
  lora_linear_cpu(x, w, a, b, bias, scaling, dropout, y, xs);
}

void lora_linear_backward(const TensorView& dy, const TensorView& x, const TensorView& w, const TensorView& a,
                          const TensorView& b, double scaling, const LoraDropout& dropout, const TensorView& dx,
                          const TensorView& da, const TensorView& db) {
  const Dims d = check_operands(x, w, a, b);
  KINDRED_CHECK(std::isfinite(scaling), "scaling must be finite, got ", scaling);
  check_dropout(dropout, x);
  check_out(dy, "dy", x, d.m, d.n, "[tokens, out_features]");
  check_out(dx, "dx", x, d.m, d.k, "[tokens, in_features]");
  check_out(da, "da", x, d.r, d.k, "lora_A's gradient");
  check_out(db, "db", x, d.n, d.r, "lora_B's gradient");
  check_cpu(x, "x", kReference);
  lora_linear_backward_cpu(dy, x, w, a, b, scaling, dropout, dx, da, db);
}

}  // namespace kindred
