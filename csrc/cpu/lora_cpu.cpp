// CPU reference of the lora family (kindred/lora.h): plain Eigen products in the accumulation type (double
// for float64 inputs, float otherwise), rounded to the I/O dtype once at the end. Arguments were validated
// in csrc/lora.cpp.
#include <Eigen/Core>
#include <algorithm>
#include <type_traits>

#include "kindred/dispatch.h"
#include "kindred/lora.h"

namespace kindred {
namespace {

template <typename S>
using RowMat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
Eigen::Map<const RowMat<T>, 0, Eigen::OuterStride<>> in(const TensorView& t) {
  return {t.ptr<const T>(), t.shape[0], t.shape[1], Eigen::OuterStride<>(t.strides[0])};
}

template <typename T>
Eigen::Map<RowMat<T>> out(const TensorView& t) {
  return {t.ptr<T>(), t.shape[0], t.shape[1]};
}

uint64_t seed_of(const LoraDropout& d) {
  if (!d.active()) return 0;
  const int32_t* s = d.seed->ptr<const int32_t>();
  return static_cast<uint64_t>(static_cast<uint32_t>(s[0])) | static_cast<uint64_t>(static_cast<uint32_t>(s[1])) << 32;
}

// Work (multiply-adds) below which a product or an elementwise pass stays on one thread: a parallel region
// costs a barrier, and barriers stall when the machine's cores are busy with other work.
constexpr int64_t kParallelWork = int64_t{1} << 20;

// l · r with the rows (or, for a short and wide result, the columns) split into blocks over the OpenMP
// threads; Eigen runs single-threaded inside (EIGEN_DONT_PARALLELIZE: its own parallel GEMM busy-waits).
template <typename S, typename L, typename R>
RowMat<S> product(const L& l, const R& r) {
  RowMat<S> c(l.rows(), r.cols());
  const int64_t rows = l.rows(), cols = r.cols(), work = rows * cols * l.cols();
  constexpr int64_t kBlock = 64;
  if (rows >= cols) {
#pragma omp parallel for schedule(dynamic) if (work > kParallelWork)
    for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
      const int64_t n = std::min(kBlock, rows - r0);
      c.middleRows(r0, n).noalias() = l.middleRows(r0, n) * r;
    }
  } else {
#pragma omp parallel for schedule(dynamic) if (work > kParallelWork)
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
      const int64_t n = std::min(kBlock, cols - c0);
      c.middleCols(c0, n).noalias() = l * r.middleCols(c0, n);
    }
  }
  return c;
}

// m ⊙ keep / (1 − p), with keep indexed by the flat row-major position (the same mask on CUDA).
template <typename S>
RowMat<S> masked(const RowMat<S>& m, const LoraDropout& d) {
  if (!d.active()) return m;
  const uint64_t seed = seed_of(d), threshold = lora_dropout_threshold(d.p);
  const S inv = static_cast<S>(1.0 / (1.0 - d.p));
  RowMat<S> r(m.rows(), m.cols());
  const int64_t n = m.size();
#pragma omp parallel for if (n > kParallelWork)
  for (int64_t i = 0; i < n; ++i)
    r.data()[i] = lora_keep(seed, static_cast<uint64_t>(i), threshold) ? m.data()[i] * inv : S(0);
  return r;
}

}  // namespace

void lora_dropout_cpu(const TensorView& x, const LoraDropout& dropout, const TensorView& out, bool accumulate) {
  with_cpu_float<true>(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = Acc<T>;
    const int64_t rows = x.shape[0], cols = x.shape[1];
    const uint64_t seed = seed_of(dropout), threshold = lora_dropout_threshold(dropout.p);
    const S inv = static_cast<S>(1.0 / (1.0 - dropout.p));
#pragma omp parallel for if (rows * cols > kParallelWork)
    for (int64_t row = 0; row < rows; ++row) {
      const T* xp = x.ptr<const T>() + row * x.strides[0];
      T* op = out.ptr<T>() + row * out.strides[0];
      for (int64_t c = 0; c < cols; ++c) {
        const uint64_t i = static_cast<uint64_t>(row * cols + c);
        const bool keep = !dropout.active() || lora_keep(seed, i, threshold);
        const S v = keep ? (dropout.active() ? static_cast<S>(xp[c]) * inv : static_cast<S>(xp[c])) : S(0);
        op[c] = static_cast<T>(accumulate ? static_cast<S>(op[c]) + v : v);
      }
    }
  });
}

void lora_linear_cpu(const TensorView& x, const TensorView& w, const TensorView& a, const TensorView& b,
                     const std::optional<TensorView>& bias, double scaling, const LoraDropout& dropout,
                     const TensorView& y, const TensorView& xs) {
  with_cpu_float<true>(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = Acc<T>;
    const RowMat<S> X = in<T>(x).template cast<S>();
    const RowMat<S> W = in<T>(w).template cast<S>();
    const RowMat<S> A = in<T>(a).template cast<S>();
    const RowMat<S> B = in<T>(b).template cast<S>();
    const RowMat<S> XS = static_cast<S>(scaling) * product<S>(masked(X, dropout), A.transpose());
    RowMat<S> Y = product<S>(X, W.transpose());
    Y += product<S>(XS, B.transpose());
    if (bias) {
      const Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>> bv(bias->ptr<const T>(), bias->shape[0]);
      Y.rowwise() += bv.template cast<S>();
    }
    out<T>(y) = Y.template cast<T>();
    out<T>(xs) = XS.template cast<T>();
  });
}

void lora_linear_backward_cpu(const TensorView& dy, const TensorView& x, const TensorView& w, const TensorView& a,
                              const TensorView& b, double scaling, const LoraDropout& dropout, const TensorView& dx,
                              const TensorView& da, const TensorView& db) {
  with_cpu_float<true>(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    using S = Acc<T>;
    const S s = static_cast<S>(scaling);
    const RowMat<S> DY = in<T>(dy).template cast<S>();
    const RowMat<S> Xd = masked(RowMat<S>(in<T>(x).template cast<S>()), dropout);
    const RowMat<S> W = in<T>(w).template cast<S>();
    const RowMat<S> A = in<T>(a).template cast<S>();
    const RowMat<S> B = in<T>(b).template cast<S>();
    const RowMat<S> G = product<S>(DY, B);  // [M, r], shared by dX and dA
    RowMat<S> DX = product<S>(DY, W);
    DX += masked(RowMat<S>(s * product<S>(G, A)), dropout);
    out<T>(dx) = DX.template cast<T>();
    out<T>(da) = (s * product<S>(G.transpose(), Xd)).template cast<T>();
    out<T>(db) = (s * product<S>(DY.transpose(), product<S>(Xd, A.transpose()))).template cast<T>();
  });
}

}  // namespace kindred
