// CPU implementations of the loss family (kindred/loss.h): the reference linear cross-entropy over tiles of
// tokens × vocabulary (Eigen GEMMs in Acc = float, or double for float64 inputs; ignored tokens skipped before
// any FLOP), and the CPU twins of the chunk steps in kernels/loss/loss_cuda.cu.
// Arguments were validated in csrc/loss.cpp.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "kindred/dispatch.h"
#include "kindred/loss.h"

namespace kindred {
namespace {

constexpr int64_t kTokenTile = 64;   // rows of hidden per task
constexpr int64_t kVocabTile = 512;  // rows of weight per GEMM: a 64 × 512 logits tile (128 KiB in f32)

template <typename T>
using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Calls fn(In{}, Acc{}) for the float dtype of t: float accumulation, double for double inputs.
template <typename Fn>
void with_types(DType t, Fn&& fn) {
  with_cpu_float<true>(t, [&](auto in) {
    using Acc = std::conditional_t<std::is_same_v<decltype(in), double>, double, float>;
    fn(in, Acc{});
  });
}

// Per-token math shared by the reference and the chunk twins (templated on the accumulation type).
template <typename A>
struct Softcap {
  A c;
  A z(A r) const { return c > 0 ? c * std::tanh(r / c) : r; }
  A dz(A z) const { return c > 0 ? A(1) - (z / c) * (z / c) : A(1); }
};

template <typename A>
A row_loss(A lse, A zy, A sumz, A vocab, const LceOptions& o) {
  const A eps = A(o.label_smoothing), lambda = A(o.z_loss);
  return lse - (A(1) - eps) * zy - eps / vocab * sumz + lambda * lse * lse;
}

// ∂loss/∂r_v · coef for one logit (is_target: v = y).
template <typename A>
A row_grad(A z, A lse, bool is_target, A coef, A vocab, const LceOptions& o, const Softcap<A>& cap) {
  const A eps = A(o.label_smoothing), lambda = A(o.z_loss);
  const A p = std::exp(z - lse) * (A(1) + A(2) * lambda * lse);
  return coef * (p - (is_target ? A(1) - eps : A(0)) - eps / vocab) * cap.dz(z);
}

// Valid rows, tiled: indices of tokens whose target is not ignore_index.
std::vector<int64_t> valid_rows(const TensorView& targets, int64_t ignore_index) {
  std::vector<int64_t> rows;
  const int32_t* y = targets.ptr<int32_t>();
  for (int64_t i = 0; i < targets.numel(); ++i)
    if (y[i] != ignore_index) rows.push_back(i);
  return rows;
}

// The Acc copy of hidden's rows rows[r0 : r1].
template <typename In, typename A>
Mat<A> gather_rows(const In* h, int64_t d, const std::vector<int64_t>& rows, int64_t r0, int64_t r1) {
  Mat<A> out(r1 - r0, d);
  for (int64_t i = r0; i < r1; ++i)
    for (int64_t k = 0; k < d; ++k) out(i - r0, k) = static_cast<A>(h[rows[i] * d + k]);
  return out;
}

// Logits tile z (after bias and softcap) of hidden tile `ht` against weight rows [v0, v1).
template <typename In, typename A>
Mat<A> logits_tile(const Mat<A>& ht, const In* w, const In* b, int64_t d, int64_t v0, int64_t v1, const Softcap<A>& cap,
                   Mat<A>* raw) {
  const Mat<A> wt = Eigen::Map<const Mat<In>>(w + v0 * d, v1 - v0, d).template cast<A>();
  Mat<A> z = ht * wt.transpose();
  if (b)
    for (int64_t v = v0; v < v1; ++v) z.col(v - v0).array() += static_cast<A>(b[v]);
  if (raw) *raw = z;
  if (cap.c > 0) z = z.unaryExpr([&](A r) { return cap.z(r); });
  return z;
}

template <typename In, typename A>
void forward_impl(const TensorView& hidden, const TensorView& weight, const std::optional<TensorView>& bias,
                  const TensorView& targets, const LceOptions& opt, const TensorView& loss_v, const TensorView& lse_v,
                  const TensorView& hit_v) {
  const int64_t n = hidden.shape[0], d = hidden.shape[1], vocab = weight.shape[0];
  const In* h = hidden.ptr<In>();
  const In* w = weight.ptr<In>();
  const In* b = bias ? bias->ptr<In>() : nullptr;
  const int32_t* y = targets.ptr<int32_t>();
  A* loss = loss_v.ptr<A>();
  A* lse = lse_v.ptr<A>();
  uint8_t* hit = hit_v.ptr<uint8_t>();
  std::fill(loss, loss + n, A(0));
  std::fill(lse, lse + n, A(0));
  std::fill(hit, hit + n, uint8_t{0});
  const std::vector<int64_t> rows = valid_rows(targets, opt.ignore_index);
  const int64_t nv = static_cast<int64_t>(rows.size()), tiles = (nv + kTokenTile - 1) / kTokenTile;
  const Softcap<A> cap{A(opt.softcap)};
#pragma omp parallel for schedule(dynamic)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t r0 = tile * kTokenTile, r1 = std::min(nv, r0 + kTokenTile), t = r1 - r0;
    const Mat<A> ht = gather_rows<In, A>(h, d, rows, r0, r1);
    std::vector<A> m(t, -std::numeric_limits<A>::infinity()), s(t, 0), sumz(t, 0), zy(t, 0);
    std::vector<A> rmax(t, -std::numeric_limits<A>::infinity());
    std::vector<int64_t> arg(t, 0);
    Mat<A> raw;
    for (int64_t v0 = 0; v0 < vocab; v0 += kVocabTile) {
      const int64_t v1 = std::min(vocab, v0 + kVocabTile);
      const Mat<A> z = logits_tile<In, A>(ht, w, b, d, v0, v1, cap, &raw);
      for (int64_t i = 0; i < t; ++i) {
        const A m_new = std::max(m[i], z.row(i).maxCoeff());
        s[i] = s[i] * std::exp(m[i] - m_new) + (z.row(i).array() - m_new).exp().sum();
        m[i] = m_new;
        sumz[i] += z.row(i).sum();
        const int64_t yi = y[rows[r0 + i]];
        if (yi >= v0 && yi < v1) zy[i] = z(i, yi - v0);
        for (int64_t v = v0; v < v1; ++v)
          if (raw(i, v - v0) > rmax[i]) rmax[i] = raw(i, v - v0), arg[i] = v;
      }
    }
    for (int64_t i = 0; i < t; ++i) {
      const int64_t row = rows[r0 + i];
      lse[row] = m[i] + std::log(s[i]);
      loss[row] = row_loss<A>(lse[row], zy[i], sumz[i], A(vocab), opt);
      hit[row] = arg[i] == y[row];
    }
  }
}

template <typename In, typename A>
void backward_impl(const TensorView& hidden, const TensorView& weight, const std::optional<TensorView>& bias,
                   const TensorView& targets, const TensorView& lse_v, const TensorView& coef_v, const LceOptions& opt,
                   const std::optional<TensorView>& d_hidden, const std::optional<TensorView>& d_weight,
                   const std::optional<TensorView>& d_bias) {
  const int64_t d = hidden.shape[1], vocab = weight.shape[0];
  const In* h = hidden.ptr<In>();
  const In* w = weight.ptr<In>();
  const In* b = bias ? bias->ptr<In>() : nullptr;
  const int32_t* y = targets.ptr<int32_t>();
  const A* lse = lse_v.ptr<A>();
  const A* coef = coef_v.ptr<A>();
  const std::vector<int64_t> rows = valid_rows(targets, opt.ignore_index);
  const int64_t nv = static_cast<int64_t>(rows.size()), tiles = (nv + kTokenTile - 1) / kTokenTile;
  const Softcap<A> cap{A(opt.softcap)};
  // G = coef·∂loss/∂r for the token tile [r0, r1) × vocabulary tile [v0, v1), from recomputed logits.
  auto grad_tile = [&](const Mat<A>& ht, int64_t r0, int64_t v0, int64_t v1) {
    Mat<A> g = logits_tile<In, A>(ht, w, b, d, v0, v1, cap, nullptr);
    for (int64_t i = 0; i < g.rows(); ++i) {
      const int64_t row = rows[r0 + i];
      for (int64_t v = v0; v < v1; ++v)
        g(i, v - v0) = row_grad<A>(g(i, v - v0), lse[row], v == y[row], coef[row], A(vocab), opt, cap);
    }
    return g;
  };
  if (d_hidden) {
    In* dh = d_hidden->ptr<In>();
    std::fill(dh, dh + d_hidden->numel(), In(0));
#pragma omp parallel for schedule(dynamic)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t r0 = tile * kTokenTile, r1 = std::min(nv, r0 + kTokenTile);
      const Mat<A> ht = gather_rows<In, A>(h, d, rows, r0, r1);
      Mat<A> acc = Mat<A>::Zero(r1 - r0, d);
      for (int64_t v0 = 0; v0 < vocab; v0 += kVocabTile) {
        const int64_t v1 = std::min(vocab, v0 + kVocabTile);
        acc.noalias() +=
            grad_tile(ht, r0, v0, v1) * Eigen::Map<const Mat<In>>(w + v0 * d, v1 - v0, d).template cast<A>();
      }
      for (int64_t i = r0; i < r1; ++i)
        for (int64_t k = 0; k < d; ++k) dh[rows[i] * d + k] = static_cast<In>(acc(i - r0, k));
    }
  }
  if (!d_weight && !d_bias) return;
  In* dw = d_weight ? d_weight->ptr<In>() : nullptr;
  In* db = d_bias ? d_bias->ptr<In>() : nullptr;
  const int64_t vtiles = (vocab + kVocabTile - 1) / kVocabTile;
  // Each task owns a vocabulary tile and sums over every token tile: deterministic, no shared accumulator.
#pragma omp parallel for schedule(dynamic)
  for (int64_t vt = 0; vt < vtiles; ++vt) {
    const int64_t v0 = vt * kVocabTile, v1 = std::min(vocab, v0 + kVocabTile);
    Mat<A> acc = Mat<A>::Zero(dw ? v1 - v0 : 0, d);
    Eigen::Matrix<A, Eigen::Dynamic, 1> bacc = Eigen::Matrix<A, Eigen::Dynamic, 1>::Zero(v1 - v0);
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t r0 = tile * kTokenTile, r1 = std::min(nv, r0 + kTokenTile);
      const Mat<A> ht = gather_rows<In, A>(h, d, rows, r0, r1);
      const Mat<A> g = grad_tile(ht, r0, v0, v1);
      if (dw) acc.noalias() += g.transpose() * ht;
      if (db) bacc += g.colwise().sum().transpose();
    }
    for (int64_t v = v0; v < v1; ++v) {
      if (dw)
        for (int64_t k = 0; k < d; ++k) dw[v * d + k] = static_cast<In>(acc(v - v0, k));
      if (db) db[v] = static_cast<In>(bacc(v - v0));
    }
  }
}

// --- chunk twins -------------------------------------------------------------------------------------------

// The chunk's row i as final logits z (bias added, softcap applied) and raw logits r.
template <typename B>
void chunk_row(const float* l, const B* bias, int64_t c, const Softcap<float>& cap, float* z, float* r) {
  for (int64_t v = 0; v < c; ++v) {
    r[v] = l[v] + (bias ? static_cast<float>(bias[v]) : 0.0f);
    z[v] = cap.z(r[v]);
  }
}

template <typename Fn>
void with_bias(const std::optional<TensorView>& bias, Fn&& fn) {
  if (!bias) return fn(static_cast<const float*>(nullptr));
  with_cpu_float(bias->dtype, [&](auto tag) { fn(bias->ptr<const decltype(tag)>()); });
}

int32_t local_target(int32_t y, const LceOptions& o, int64_t col0, int64_t c) {
  return (y != o.ignore_index && y >= col0 && y < col0 + c) ? static_cast<int32_t>(y - col0) : -1;
}

}  // namespace

void linear_cross_entropy_cpu(const TensorView& hidden, const TensorView& weight, const std::optional<TensorView>& bias,
                              const TensorView& targets, const LceOptions& opt, const TensorView& loss,
                              const TensorView& lse, const TensorView& hit) {
  with_types(hidden.dtype, [&](auto in, auto acc) {
    forward_impl<decltype(in), decltype(acc)>(hidden, weight, bias, targets, opt, loss, lse, hit);
  });
}

void linear_cross_entropy_backward_cpu(const TensorView& hidden, const TensorView& weight,
                                       const std::optional<TensorView>& bias, const TensorView& targets,
                                       const TensorView& lse, const TensorView& coef, const LceOptions& opt,
                                       const std::optional<TensorView>& d_hidden,
                                       const std::optional<TensorView>& d_weight,
                                       const std::optional<TensorView>& d_bias) {
  with_types(hidden.dtype, [&](auto in, auto acc) {
    backward_impl<decltype(in), decltype(acc)>(hidden, weight, bias, targets, lse, coef, opt, d_hidden, d_weight,
                                               d_bias);
  });
}

void lce_chunk_update_cpu(const TensorView& logits, const std::optional<TensorView>& bias, const TensorView& targets,
                          int64_t col0, int64_t vocab, const LceOptions& opt, const TensorView& state_v,
                          const TensorView& argmax_v, const std::optional<TensorView>& exp_out,
                          const std::optional<TensorView>& acc_v) {
  (void)vocab;
  const int64_t t = logits.shape[0], c = logits.shape[1];
  if (c == 0) return;
  const Softcap<float> cap{static_cast<float>(opt.softcap)};
  const int32_t* y = targets.ptr<int32_t>();
  float* st = state_v.ptr<float>();
  int32_t* arg = argmax_v.ptr<int32_t>();
  const int64_t d = acc_v ? acc_v->shape[1] : 0;
  float* acc = acc_v ? acc_v->ptr<float>() : nullptr;
  const float margin = exp_out && exp_out->dtype == DType::f16 ? kLceMarginF16 : kLceMargin;
  with_bias(bias, [&](auto* b) {
    with_cpu_float(exp_out ? exp_out->dtype : DType::f32, [&](auto tag) {
      using E = decltype(tag);
#pragma omp parallel for
      for (int64_t i = 0; i < t; ++i) {
        std::vector<float> z(c), r(c);
        chunk_row(logits.ptr<float>() + i * logits.strides[0], b, c, cap, z.data(), r.data());
        float* s = st + i * kLceStateCols;
        const int32_t yl = local_target(y[i], opt, col0, c);
        float cmax = -std::numeric_limits<float>::infinity(), rbest = cmax, sumz = 0.0f;
        int64_t ibest = 0;
        for (int64_t v = 0; v < c; ++v) {
          cmax = std::max(cmax, z[v]);
          if (r[v] > rbest) rbest = r[v], ibest = v;
          sumz += z[v];
        }
        if (rbest > s[kLceRMax]) s[kLceRMax] = rbest, arg[i] = static_cast<int32_t>(col0 + ibest);
        const float m_old = s[kLceMax], m_new = std::max(m_old, cmax);
        float ref = s[kLceRef];
        if (exp_out) {
          if (ref == -std::numeric_limits<float>::infinity()) {
            ref = m_new;
          } else if (m_new > ref + margin) {
            const float f = std::exp(ref - m_new);
            for (int64_t k = 0; k < d; ++k) acc[i * d + k] *= f;
            ref = m_new;
          }
          s[kLceRef] = ref;
        }
        float sum = 0.0f;
        E* e = exp_out ? exp_out->ptr<E>() + i * exp_out->strides[0] : nullptr;
        for (int64_t v = 0; v < c; ++v) {
          sum += std::exp(z[v] - m_new);
          if (e) e[v] = static_cast<E>(std::exp(z[v] - ref) * cap.dz(z[v]));
        }
        s[kLceSum] = s[kLceSum] * std::exp(m_old - m_new) + sum;
        s[kLceMax] = m_new;
        s[kLceSumZ] += sumz;
        if (yl >= 0) s[kLceZy] = z[yl];
      }
    });
  });
}

void lce_chunk_grad_cpu(const TensorView& logits, const std::optional<TensorView>& bias, const TensorView& targets,
                        int64_t col0, int64_t vocab, const LceOptions& opt, const TensorView& lse_v,
                        const TensorView& coef_v, const TensorView& grad_out) {
  const int64_t t = logits.shape[0], c = logits.shape[1];
  if (c == 0) return;
  const Softcap<float> cap{static_cast<float>(opt.softcap)};
  const int32_t* y = targets.ptr<int32_t>();
  const float* lse = lse_v.ptr<float>();
  const float* coef = coef_v.ptr<float>();
  with_bias(bias, [&](auto* b) {
    with_cpu_float(grad_out.dtype, [&](auto tag) {
      using G = decltype(tag);
#pragma omp parallel for
      for (int64_t i = 0; i < t; ++i) {
        std::vector<float> z(c), r(c);
        chunk_row(logits.ptr<float>() + i * logits.strides[0], b, c, cap, z.data(), r.data());
        G* g = grad_out.ptr<G>() + i * grad_out.strides[0];
        const bool ignored = y[i] == opt.ignore_index;
        const int32_t yl = local_target(y[i], opt, col0, c);
        for (int64_t v = 0; v < c; ++v)
          g[v] = static_cast<G>(
              ignored ? 0.0f : row_grad<float>(z[v], lse[i], v == yl, coef[i], static_cast<float>(vocab), opt, cap));
      }
    });
  });
}

void lce_finalize_cpu(const TensorView& state_v, const TensorView& argmax_v, const TensorView& targets, int64_t vocab,
                      const LceOptions& opt, const TensorView& loss_v, const TensorView& lse_v, const TensorView& hit_v,
                      const std::optional<TensorView>& acc_v, const std::optional<TensorView>& weight,
                      const std::optional<TensorView>& wsum_v, const std::optional<TensorView>& scale_v,
                      const std::optional<TensorView>& d_hidden) {
  const int64_t t = state_v.shape[0], d = acc_v ? acc_v->shape[1] : 0;
  const float* st = state_v.ptr<float>();
  const int32_t* arg = argmax_v.ptr<int32_t>();
  const int32_t* y = targets.ptr<int32_t>();
  float* loss = loss_v.ptr<float>();
  float* lse = lse_v.ptr<float>();
  uint8_t* hit = hit_v.ptr<uint8_t>();
  const Softcap<float> cap{static_cast<float>(opt.softcap)};
  const float eps = static_cast<float>(opt.label_smoothing), lambda = static_cast<float>(opt.z_loss);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  with_cpu_float(weight ? weight->dtype : DType::f32, [&](auto tag) {
    using W = decltype(tag);
#pragma omp parallel for
    for (int64_t i = 0; i < t; ++i) {
      const float* s = st + i * kLceStateCols;
      const bool ignored = y[i] == opt.ignore_index, in_range = y[i] >= 0 && y[i] < vocab;
      const float l = s[kLceMax] + std::log(s[kLceSum]);
      lse[i] = ignored ? 0.0f : l;
      loss[i] = ignored ? 0.0f : in_range ? row_loss<float>(l, s[kLceZy], s[kLceSumZ], float(vocab), opt) : nan;
      hit[i] = !ignored && arg[i] == y[i];
      if (!acc_v) continue;
      float* a = acc_v->ptr<float>() + i * d;
      W* dh = d_hidden->ptr<W>() + i * d;
      const float scale = scale_v->ptr<float>()[0];
      const float f = scale * (1.0f + 2.0f * lambda * l) * std::exp(s[kLceRef] - l);
      const float ft = scale * (1.0f - eps) * cap.dz(s[kLceZy]), fs = scale * eps / static_cast<float>(vocab);
      const W* wy = in_range ? weight->ptr<W>() + y[i] * d : nullptr;
      const float* ws = wsum_v ? wsum_v->ptr<float>() : nullptr;
      for (int64_t k = 0; k < d; ++k) {
        float g = f * a[k] - (wy ? ft * static_cast<float>(wy[k]) : nan) - (ws ? fs * ws[k] : 0.0f);
        dh[k] = static_cast<W>(ignored ? 0.0f : g);
        a[k] = 0.0f;
      }
    }
  });
}

}  // namespace kindred
