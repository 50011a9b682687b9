// TensorView helpers and the named argument checks shared by every op.
#include "kindred/common.h"

namespace kindred {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::u8:
      return "uint8";
    case DType::i32:
      return "int32";
    case DType::f16:
      return "float16";
    case DType::bf16:
      return "bfloat16";
    case DType::f32:
      return "float32";
    case DType::f64:
      return "float64";
    case DType::i64:
      return "int64";
  }
  return "?";
}

int dtype_size(DType t) {
  switch (t) {
    case DType::u8:
      return 1;
    case DType::f16:
    case DType::bf16:
      return 2;
    case DType::i32:
    case DType::f32:
      return 4;
    case DType::f64:
    case DType::i64:
      return 8;
  }
  return 0;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

bool TensorView::contiguous() const {
  int64_t expected = 1;
  for (int64_t i = dim() - 1; i >= 0; --i) {
    if (shape[i] != 1 && strides[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

std::string TensorView::describe() const {
  std::string s = cat(dtype_name(dtype), "[");
  for (size_t i = 0; i < shape.size(); ++i) s += cat(i ? ", " : "", shape[i]);
  return s + "] on " + (device == Device::cpu ? "cpu" : cat("cuda:", device_index));
}

void check_dtype(const TensorView& t, const char* name, std::initializer_list<DType> allowed) {
  for (DType d : allowed)
    if (t.dtype == d) return;
  std::string names;
  for (DType d : allowed) names += std::string(names.empty() ? "" : " or ") + dtype_name(d);
  KINDRED_CHECK(false, name, " must be ", names, ", got ", t.describe());
}

void check_contiguous(const TensorView& t, const char* name) {
  KINDRED_CHECK(t.contiguous(), name, " must be contiguous, got a strided ", t.describe());
}

void check_shape(const TensorView& t, const char* name, const std::vector<int64_t>& expected) {
  bool ok = t.shape == expected;
  if (!ok) {
    std::string want = "[";
    for (size_t i = 0; i < expected.size(); ++i) want += cat(i ? ", " : "", expected[i]);
    KINDRED_CHECK(false, name, " must have shape ", want, "], got ", t.describe());
  }
}

void check_same_device(const TensorView& a, const char* name_a, const TensorView& b, const char* name_b) {
  KINDRED_CHECK(a.device == b.device && a.device_index == b.device_index, name_a, " and ", name_b,
                " must be on the same device, got ", a.describe(), " and ", b.describe());
}

bool cuda_compiled() {
#ifdef KINDRED_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace kindred
