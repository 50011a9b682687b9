// Test helper: a contiguous TensorView over a std::vector (CPU), shared by the GoogleTest files.
#pragma once

#include <vector>

#include "kindred/common.h"

namespace kindred::testing {

template <typename T>
TensorView view(std::vector<T>& v, DType dt, std::vector<int64_t> shape) {
  TensorView t;
  t.data = v.data();
  t.dtype = dt;
  t.shape = shape;
  t.strides.assign(shape.size(), 1);
  for (int64_t i = static_cast<int64_t>(shape.size()) - 2; i >= 0; --i) t.strides[i] = t.strides[i + 1] * shape[i + 1];
  return t;
}

// The 1-D view of all of v.
template <typename T>
TensorView view(std::vector<T>& v, DType dt) {
  return view(v, dt, {static_cast<int64_t>(v.size())});
}

}  // namespace kindred::testing
