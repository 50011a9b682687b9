// Validation and device dispatch of the norm family (declarations and semantics: kindred/norm.h).
#include "kindred/norm.h"

#include <cmath>

#include "kindred/dispatch.h"

namespace kindred {
namespace {

// x: a float dtype the device runs, 2-D with D > 0 (its strides: check_rows).
void check_x(const TensorView& x) {
  check_dtype(x, "x", {DType::f32, DType::f64, DType::f16, DType::bf16});
  KINDRED_CHECK(x.device == Device::cpu || x.dtype != DType::f64,
                "x on CUDA must be float32, float16 or bfloat16, got ", x.describe());
  KINDRED_CHECK(x.dim() == 2 && x.shape[1] > 0, "x must be 2-D [rows, features], got ", x.describe());
}

// x's dtype, device and shape, unit column stride and rows at least a row apart (a column range of a wider buffer).
void check_rows(const TensorView& t, const char* name, const TensorView& x) {
  const int64_t rows = x.shape[0], cols = x.shape[1];
  KINDRED_CHECK(t.dtype == x.dtype, name, " must have x's dtype ", dtype_name(x.dtype), ", got ", t.describe());
  check_same_device(t, name, x, "x");
  KINDRED_CHECK(t.dim() == 2 && t.shape[0] == rows && t.shape[1] == cols && (cols <= 1 || t.strides[1] == 1) &&
                    (rows <= 1 || t.strides[0] >= cols),
                name, " must be [", rows, ", ", cols, "] with unit column stride and a row stride >= ", cols, ", got ",
                t.describe());
}

// x's dtype, device and shape, contiguous.
void check_out(const TensorView& t, const char* name, const TensorView& x) {
  KINDRED_CHECK(t.dtype == x.dtype, name, " must have x's dtype ", dtype_name(x.dtype), ", got ", t.describe());
  check_same_device(t, name, x, "x");
  check_shape(t, name, x.shape);
  check_contiguous(t, name);
}

void check_w(const TensorView& w, const TensorView& x) {
  if (x.dtype == DType::f32)
    check_dtype(w, "w", {DType::f32});
  else
    check_dtype(w, "w", {x.dtype, DType::f32});  // Gemma's weights may be kept in either
  check_same_device(w, "w", x, "x");
  check_shape(w, "w", {x.shape[1]});
  check_contiguous(w, "w");
}

void check_rstd(const TensorView& rstd, const TensorView& x) {
  check_dtype(rstd, "rstd", {x.dtype == DType::f64 ? DType::f64 : DType::f32});
  check_same_device(rstd, "rstd", x, "x");
  check_shape(rstd, "rstd", {x.shape[0]});
  check_contiguous(rstd, "rstd");
}

void check_offset(double offset) {
  KINDRED_CHECK(offset == 0.0 || offset == 1.0, "offset must be 0 (scale w) or 1 (scale 1 + w), got ", offset);
}

void check_cuda_features(const TensorView& x) {
  KINDRED_CHECK(x.shape[1] <= kRmsNormMaxCudaFeatures, "x's features must be <= ", kRmsNormMaxCudaFeatures,
                " for the CUDA kernel (one block holds a row in registers), got ", x.describe());
}

}  // namespace

void rms_norm(const TensorView& x, const TensorView& w, double eps, double offset, const TensorView& out,
              const TensorView& rstd, int64_t stream) {
  check_x(x);
  check_rows(x, "x", x);
  check_w(w, x);
  check_out(out, "out", x);
  check_rstd(rstd, x);
  KINDRED_CHECK(std::isfinite(eps) && eps > 0.0, "eps must be finite and > 0, got ", eps);
  check_offset(offset);
  if (x.shape[0] == 0) return;
  if (x.device == Device::cpu) return rms_norm_cpu(x, w, eps, offset, out, rstd);
  check_cuda_features(x);
  KINDRED_CALL_CUDA(rms_norm, x, w, eps, offset, out, rstd, stream);
}

void rms_norm_backward(const TensorView& dout, const TensorView& x, const TensorView& w, const TensorView& rstd,
                       double offset, const TensorView& dx, int64_t stream) {
  check_x(x);
  check_rows(x, "x", x);
  check_rows(dout, "dout", x);
  check_w(w, x);
  check_rstd(rstd, x);
  check_offset(offset);
  check_out(dx, "dx", x);
  if (x.shape[0] == 0) return;
  if (x.device == Device::cpu) return rms_norm_backward_cpu(dout, x, w, rstd, offset, dx);
  check_cuda_features(x);
  KINDRED_CALL_CUDA(rms_norm_backward, dout, x, w, rstd, offset, dx, stream);
}

}  // namespace kindred
