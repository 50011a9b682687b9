// CPU reference of the fused family (semantics: kindred/fused.h). Arithmetic in float (double for float64),
// rounded to T where the unfused torch ops round; arguments were validated in csrc/fused.cpp.
#include <cmath>
#include <type_traits>

#include "kindred/dispatch.h"
#include "kindred/fused.h"

namespace kindred {
namespace {

template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
T round_to(Acc<T> v) {
  return static_cast<T>(v);
}

// T(v · rsqrt(mean(v²) + eps) · w) for one row of n values (already rounded to T).
template <typename T>
void rms_norm_row(const T* v, const T* w, int64_t n, double eps, T* out) {
  using A = Acc<T>;
  A sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<A>(v[i]) * static_cast<A>(v[i]);
  const A inv = A(1) / std::sqrt(sum / static_cast<A>(n) + static_cast<A>(eps));
  for (int64_t i = 0; i < n; ++i) out[i] = round_to<T>(static_cast<A>(v[i]) * inv * static_cast<A>(w[i]));
}

// T(T(a · b) + T(c · d)): a product and a sum of two products as torch's mul and add round them.
template <typename T>
T mul_add(Acc<T> a, Acc<T> b, Acc<T> c, Acc<T> d) {
  using A = Acc<T>;
  return round_to<T>(static_cast<A>(round_to<T>(a * b)) + static_cast<A>(round_to<T>(c * d)));
}

// Rotate-half rotary of the first `rot` values in place (the rest pass through), or its transpose.
template <typename T>
void rotary_row(T* x, const T* cos, const T* sin, int64_t rot, bool inverse) {
  using A = Acc<T>;
  const int64_t half = rot / 2;
  for (int64_t i = 0; i < half; ++i) {
    const A x1 = static_cast<A>(x[i]), x2 = static_cast<A>(x[i + half]);
    const A c1 = static_cast<A>(cos[i]), s1 = static_cast<A>(sin[i]);
    const A c2 = static_cast<A>(cos[i + half]), s2 = static_cast<A>(sin[i + half]);
    x[i] = inverse ? mul_add<T>(x1, c1, x2, s2) : mul_add<T>(x1, c1, -x2, s1);
    x[i + half] = inverse ? mul_add<T>(x2, c2, -x1, s1) : mul_add<T>(x2, c2, x1, s2);
  }
}

}  // namespace

void add_rms_norm_cpu(const TensorView& x, const TensorView& residual, const TensorView& w, double eps,
                      const TensorView& out, const TensorView& residual_out) {
  with_cpu_float<true>(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    const int64_t m = x.shape[0], d = x.shape[1];
    const T* xp = x.ptr<const T>();
    const T* rp = residual.ptr<const T>();
    std::vector<T> s(d);
#pragma omp parallel for firstprivate(s)
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t i = 0; i < d; ++i)
        s[i] = round_to<T>(static_cast<A>(xp[r * x.strides[0] + i]) + static_cast<A>(rp[r * residual.strides[0] + i]));
      rms_norm_row(s.data(), w.ptr<const T>(), d, eps, out.ptr<T>() + r * d);
      std::copy(s.begin(), s.end(), residual_out.ptr<T>() + r * d);
    }
  });
}

void silu_mul_cpu(const TensorView& gate, const TensorView& up, const TensorView& out) {
  with_cpu_float<true>(gate.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    const int64_t m = gate.shape[0], n = gate.shape[1];
#pragma omp parallel for
    for (int64_t r = 0; r < m; ++r) {
      const T* g = gate.ptr<const T>() + r * gate.strides[0];
      const T* u = up.ptr<const T>() + r * up.strides[0];
      T* o = out.ptr<T>() + r * n;
      for (int64_t i = 0; i < n; ++i) {
        const A gv = static_cast<A>(g[i]);
        const T act = round_to<T>(gv / (A(1) + std::exp(-gv)));
        o[i] = round_to<T>(static_cast<A>(act) * static_cast<A>(u[i]));
      }
    }
  });
}

void rope_qk_cache_cpu(const RopeQkCache& a) {
  const int64_t b = a.q.shape[0], hkv = a.cache_k.shape[1], cap = a.cache_k.shape[2], d = a.cache_k.shape[3];
  const int64_t h = a.q.shape[1] / d, rot = a.cos.shape[1];
  const int64_t* slots = a.slots.ptr<const int64_t>();
  for (int64_t r = 0; r < b; ++r)
    KINDRED_CHECK(slots[r] >= 0 && slots[r] < cap, "slots[", r, "] = ", slots[r], " is outside the cache's capacity ",
                  cap);
  with_cpu_float<true>(a.q.dtype, [&](auto tag) {
    using T = decltype(tag);
    std::vector<T> head(d);
    // One head of row r: normalized (when norm), rotated, written to dst.
    auto one = [&](const T* src, const std::optional<TensorView>& norm, int64_t r, T* dst) {
      if (norm)
        rms_norm_row(src, norm->ptr<const T>(), d, a.eps, head.data());
      else
        std::copy(src, src + d, head.data());
      rotary_row(head.data(), a.cos.ptr<const T>() + r * a.cos.strides[0], a.sin.ptr<const T>() + r * a.sin.strides[0],
                 rot, false);
      std::copy(head.begin(), head.end(), dst);
    };
    for (int64_t r = 0; r < b; ++r) {
      const int64_t slot = slots[r];
      for (int64_t i = 0; i < h; ++i)
        one(a.q.ptr<const T>() + r * a.q.strides[0] + i * d, a.q_norm, r, a.q_out.ptr<T>() + (r * h + i) * d);
      for (int64_t i = 0; i < hkv; ++i) {
        const int64_t at = ((r * hkv + i) * cap + slot) * d;
        one(a.k.ptr<const T>() + r * a.k.strides[0] + i * d, a.k_norm, r, a.cache_k.ptr<T>() + at);
        const T* v = a.v.ptr<const T>() + r * a.v.strides[0] + i * d;
        std::copy(v, v + d, a.cache_v.ptr<T>() + at);
      }
    }
  });
}

void rope_rotate_cpu(const TensorView& x, const TensorView& cos, const TensorView& sin, bool inverse,
                     const TensorView& out) {
  with_cpu_float<true>(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t rows = x.shape[0], heads = x.shape[1], d = x.shape[2], rot = cos.shape[1];
#pragma omp parallel for
    for (int64_t r = 0; r < rows; ++r) {
      const T* c = cos.ptr<const T>() + r * cos.strides[0];
      const T* s = sin.ptr<const T>() + r * sin.strides[0];
      for (int64_t h = 0; h < heads; ++h) {
        const T* src = x.ptr<const T>() + r * x.strides[0] + h * x.strides[1];
        T* dst = out.ptr<T>() + (r * heads + h) * d;
        std::copy(src, src + d, dst);
        rotary_row(dst, c, s, rot, inverse);
      }
    }
  });
}

void silu_mul_backward_cpu(const TensorView& dout, const TensorView& gate, const TensorView& up,
                           const TensorView& dgate, const TensorView& dup) {
  with_cpu_float<true>(gate.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    const int64_t m = gate.shape[0], n = gate.shape[1];
#pragma omp parallel for
    for (int64_t r = 0; r < m; ++r) {
      const T* dy = dout.ptr<const T>() + r * dout.strides[0];
      const T* g = gate.ptr<const T>() + r * gate.strides[0];
      const T* u = up.ptr<const T>() + r * up.strides[0];
      T* dg = dgate.ptr<T>() + r * n;
      T* du = dup.ptr<T>() + r * n;
      for (int64_t i = 0; i < n; ++i) {
        const A gv = static_cast<A>(g[i]), dyv = static_cast<A>(dy[i]);
        const A e = std::exp(-gv);
        const T act = round_to<T>(gv / (A(1) + e));
        const A sig = A(1) / (A(1) + e);
        const A ds = static_cast<A>(round_to<T>(dyv * static_cast<A>(u[i])));
        du[i] = round_to<T>(dyv * static_cast<A>(act));
        dg[i] = round_to<T>(ds * sig * std::fma(gv, A(1) - sig, A(1)));  // torch's kernels contract it too
      }
    }
  });
}

}  // namespace kindred
