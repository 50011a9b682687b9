// CPU reference of the norm family (semantics: kindred/norm.h): arithmetic in float (double for float64), one
// rounding to T per output; arguments were validated in csrc/norm.cpp.
#include <cmath>
#include <type_traits>

#include "kindred/dispatch.h"
#include "kindred/norm.h"

namespace kindred {
namespace {

template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Calls fn(T{}, W{}) with T x's CPU element type and W w's: T itself or float.
template <typename Fn>
void with_x_and_w(const TensorView& x, const TensorView& w, Fn&& fn) {
  with_cpu_float<true>(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (w.dtype == DType::f32)
      fn(T{}, float{});
    else
      fn(T{}, T{});
  });
}

}  // namespace

void rms_norm_cpu(const TensorView& x, const TensorView& w, double eps, double offset, const TensorView& out,
                  const TensorView& rstd) {
  with_x_and_w(x, w, [&](auto t_tag, auto w_tag) {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    using A = Acc<T>;
    const int64_t m = x.shape[0], d = x.shape[1];
    const W* wp = w.ptr<const W>();
    const A off = static_cast<A>(offset);
#pragma omp parallel for
    for (int64_t r = 0; r < m; ++r) {
      const T* xr = x.ptr<const T>() + r * x.strides[0];
      T* o = out.ptr<T>() + r * d;
      A sum = 0;
      for (int64_t i = 0; i < d; ++i) sum += static_cast<A>(xr[i]) * static_cast<A>(xr[i]);
      const A inv = A(1) / std::sqrt(sum / static_cast<A>(d) + static_cast<A>(eps));
      rstd.ptr<A>()[r] = inv;
      for (int64_t i = 0; i < d; ++i)
        o[i] = static_cast<T>(static_cast<A>(xr[i]) * inv * (off + static_cast<A>(wp[i])));
    }
  });
}

void rms_norm_backward_cpu(const TensorView& dout, const TensorView& x, const TensorView& w, const TensorView& rstd,
                           double offset, const TensorView& dx) {
  with_x_and_w(x, w, [&](auto t_tag, auto w_tag) {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    using A = Acc<T>;
    const int64_t m = x.shape[0], d = x.shape[1];
    const W* wp = w.ptr<const W>();
    const A off = static_cast<A>(offset);
#pragma omp parallel for
    for (int64_t r = 0; r < m; ++r) {
      const T* xr = x.ptr<const T>() + r * x.strides[0];
      const T* g = dout.ptr<const T>() + r * dout.strides[0];
      T* o = dx.ptr<T>() + r * d;
      const A inv = rstd.ptr<const A>()[r];
      // gw_i = dout_i · (offset + w_i), x̂_i = x_i · r: recomputed in the second pass (cheaper than a buffer).
      auto gw = [&](int64_t i) { return static_cast<A>(g[i]) * (off + static_cast<A>(wp[i])); };
      auto xhat = [&](int64_t i) { return static_cast<A>(xr[i]) * inv; };
      A dot = 0;
      for (int64_t i = 0; i < d; ++i) dot += xhat(i) * gw(i);
      const A mean = dot / static_cast<A>(d);
      for (int64_t i = 0; i < d; ++i) o[i] = static_cast<T>(inv * (gw(i) - xhat(i) * mean));
    }
  });
}

}  // namespace kindred
