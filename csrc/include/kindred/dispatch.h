// What every validate-and-dispatch file (csrc/<family>.cpp) and CPU implementation (csrc/cpu/) shares: the
// call into a CUDA implementation, the CPU element type of a float dtype, and the checks that a tensor is on
// the CPU and finite. Host code only (includes Eigen); kernels use kernels/common.cuh.
#pragma once

#include <Eigen/Core>
#include <cmath>

#include "kindred/common.h"

// Calls `<op>_cuda(args...)`, or says the build has no CUDA.
#ifdef KINDRED_WITH_CUDA
#define KINDRED_CALL_CUDA(op, ...) op##_cuda(__VA_ARGS__)
#else
#define KINDRED_CALL_CUDA(op, ...)                                                                                     \
  throw ::kindred::Error(#op ": kindred was built without CUDA; rebuild with nvcc on the PATH (or -DKINDRED_CUDA=ON)", \
                         true)
#endif

namespace kindred {

// Calls fn(T{}) with T the CPU element type of a float dtype: float, Eigen::half or Eigen::bfloat16, and
// double when kWithF64. Returns what fn returns.
template <bool kWithF64 = false, typename Fn>
decltype(auto) with_cpu_float(DType t, Fn&& fn) {
  switch (t) {
    case DType::f32:
      return fn(float{});
    case DType::f16:
      return fn(Eigen::half{});
    case DType::bf16:
      return fn(Eigen::bfloat16{});
    case DType::f64:
      if constexpr (kWithF64) return fn(double{});
      break;
    default:
      break;
  }
  throw Error(cat("unsupported dtype ", dtype_name(t)), true);
}

// Throws unless `t` is on the CPU; `what` says why (e.g. "the AWQ repack runs on the CPU").
inline void check_cpu(const TensorView& t, const char* name, const char* what) {
  KINDRED_CHECK(t.device == Device::cpu, name, " must be on the CPU (", what, "), got ", t.describe());
}

template <typename T>
float to_f32(T v) {
  return static_cast<float>(v);
}

// Throws naming the first non-finite element; quantizing NaN/Inf would silently poison a whole block.
template <typename T>
void check_finite(const T* w, int64_t n, const char* name) {
  int64_t first = n;
#pragma omp parallel for reduction(min : first)
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(to_f32(w[i])) && i < first) first = i;
  KINDRED_CHECK(first == n, name, " holds a non-finite value (", to_f32(w[first]), ") at flat index ", first);
}

}  // namespace kindred
