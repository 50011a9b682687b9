// The loss op family: fused linear cross-entropy, loss = CE(softcap(hidden · weightᵀ + bias), targets), without
// the [tokens × vocab] logits in memory.
//
// Per token n with raw logits r_v = h_n·W_v + b_v, final logits z_v = c·tanh(r_v / c) (softcap c) or r_v,
// lse = log Σ_v e^{z_v}, target y, smoothing ε, z-loss λ:
//   loss_n = lse − (1 − ε)·z_y − (ε / V)·Σ_v z_v + λ·lse²          (0 for ignored tokens)
//   ∂loss_n/∂r_v = (p_v·(1 + 2λ·lse) − (1 − ε)·[v = y] − ε / V) · dz_v/dr_v,   p_v = e^{z_v − lse},
//   dz/dr = 1 − (z / c)² with a softcap, else 1.
// hit_n = 1 when the first index of max_v r_v is y (the argmax of z, tie-free: tanh is monotone).
//
// Two groups of ops:
// - linear_cross_entropy_{forward,backward}: the CPU reference (csrc/cpu/loss_cpu.cpp), tiles of tokens ×
//   vocabulary, Eigen GEMMs in float (float32/16/bf16 inputs) or double (float64 inputs).
// - lce_chunk_update / lce_chunk_grad / lce_finalize: the row-wise steps between the GEMMs of the chunked
//   algorithm that python/kindred/_ops_loss.py orchestrates over cuBLAS (CUDA) or torch.mm (CPU, for tests);
//   implemented in csrc/cpu/loss_cpu.cpp and kernels/loss/loss_cuda.cu with identical semantics.
#pragma once

#include <optional>

#include "kindred/common.h"

namespace kindred {

struct LceOptions {
  int64_t ignore_index = kIgnoreIndex;
  double label_smoothing = 0.0;  // ε in [0, 1]
  double z_loss = 0.0;           // λ ≥ 0
  double softcap = 0.0;          // c > 0, or 0 for none
};

// Columns of the per-row running state of the chunked algorithm (f32 [T, kLceStateCols]).
enum LceState : int {
  kLceMax = 0,   // running max of z
  kLceSum = 1,   // Σ e^{z − max}
  kLceRef = 2,   // reference max of the dH accumulator (single pass only)
  kLceSumZ = 3,  // Σ z (label smoothing)
  kLceZy = 4,    // z of the target (NaN until found)
  kLceRMax = 5,  // max of the raw logits r (argmax)
  kLceStateCols = 6,
};

// Rescale the dH accumulator when a row's max exceeds its reference by more than this: e^16 stays exact in
// f32 and bf16; float16 (max 65504) gets e^8.
constexpr float kLceMargin = 16.0f;
constexpr float kLceMarginF16 = 8.0f;

// --- CPU reference -------------------------------------------------------------------------------------------
// hidden [N, D], weight [V, D], bias [V] (same float dtype, contiguous), targets i32 [N] in [0, V) or
// ignore_index. Outputs (f64 for f64 inputs, else f32): loss [N], lse [N]; hit u8 [N].
void linear_cross_entropy(const TensorView& hidden, const TensorView& weight, const std::optional<TensorView>& bias,
                          const TensorView& targets, const LceOptions& opt, const TensorView& loss,
                          const TensorView& lse, const TensorView& hit);
// coef [N] (loss dtype) = ∂total/∂loss_n; gradients wanted are passed, in the inputs' dtype.
void linear_cross_entropy_backward(const TensorView& hidden, const TensorView& weight,
                                   const std::optional<TensorView>& bias, const TensorView& targets,
                                   const TensorView& lse, const TensorView& coef, const LceOptions& opt,
                                   const std::optional<TensorView>& d_hidden, const std::optional<TensorView>& d_weight,
                                   const std::optional<TensorView>& d_bias);

// --- Steps of the chunked algorithm (one token block of T rows, one vocabulary chunk of C columns) ---------
// logits: f32 [T, C] (hidden_blk · W[col0 : col0 + C]ᵀ); bias: the same chunk of the bias, [C]; targets i32 [T];
// vocab: V. Updates state f32 [T, kLceStateCols] and argmax i32 [T] with the chunk.
// Single pass (exp_out and acc given): exp_out (dtype of hidden; a view whose row n lies in logits' row n, e.g.
// the same memory) receives e^{z − ref}·dz/dr, after acc (f32 [T, D]) rows whose max moved past ref by more
// than the margin are rescaled to the new ref.
void lce_chunk_update(const TensorView& logits, const std::optional<TensorView>& bias, const TensorView& targets,
                      int64_t col0, int64_t vocab, const LceOptions& opt, const TensorView& state,
                      const TensorView& argmax, const std::optional<TensorView>& exp_out,
                      const std::optional<TensorView>& acc, int64_t stream);

// grad_out (a view aliasing logits row by row, as exp_out above) receives coef_n·∂loss_n/∂r_v, from lse f32 [T] and
// coef f32 [T]; rows with an ignored target get 0.
void lce_chunk_grad(const TensorView& logits, const std::optional<TensorView>& bias, const TensorView& targets,
                    int64_t col0, int64_t vocab, const LceOptions& opt, const TensorView& lse, const TensorView& coef,
                    const TensorView& grad_out, int64_t stream);

// Per row: lse, loss and hit from the state (ignored rows: 0; a target outside [0, V): NaN loss, no hit).
// Single pass (acc, weight, scale, d_hidden given): d_hidden [T, D] (dtype of weight) =
//   scale·((1 + 2λ·lse)·e^{ref − lse}·acc − (1 − ε)·dz_y·W_y − (ε / V)·wsum), scale f32 [1] (1 / count for
// mean), wsum f32 [D] = Σ_v W_v (required when ε > 0; the single pass excludes softcap with ε > 0); acc is
// zeroed for the next token block.
void lce_finalize(const TensorView& state, const TensorView& argmax, const TensorView& targets, int64_t vocab,
                  const LceOptions& opt, const TensorView& loss, const TensorView& lse, const TensorView& hit,
                  const std::optional<TensorView>& acc, const std::optional<TensorView>& weight,
                  const std::optional<TensorView>& wsum, const std::optional<TensorView>& scale,
                  const std::optional<TensorView>& d_hidden, int64_t stream);

void linear_cross_entropy_cpu(const TensorView& hidden, const TensorView& weight, const std::optional<TensorView>& bias,
                              const TensorView& targets, const LceOptions& opt, const TensorView& loss,
                              const TensorView& lse, const TensorView& hit);
void linear_cross_entropy_backward_cpu(const TensorView& hidden, const TensorView& weight,
                                       const std::optional<TensorView>& bias, const TensorView& targets,
                                       const TensorView& lse, const TensorView& coef, const LceOptions& opt,
                                       const std::optional<TensorView>& d_hidden,
                                       const std::optional<TensorView>& d_weight,
                                       const std::optional<TensorView>& d_bias);
void lce_chunk_update_cpu(const TensorView& logits, const std::optional<TensorView>& bias, const TensorView& targets,
                          int64_t col0, int64_t vocab, const LceOptions& opt, const TensorView& state,
                          const TensorView& argmax, const std::optional<TensorView>& exp_out,
                          const std::optional<TensorView>& acc);
void lce_chunk_grad_cpu(const TensorView& logits, const std::optional<TensorView>& bias, const TensorView& targets,
                        int64_t col0, int64_t vocab, const LceOptions& opt, const TensorView& lse,
                        const TensorView& coef, const TensorView& grad_out);
void lce_finalize_cpu(const TensorView& state, const TensorView& argmax, const TensorView& targets, int64_t vocab,
                      const LceOptions& opt, const TensorView& loss, const TensorView& lse, const TensorView& hit,
                      const std::optional<TensorView>& acc, const std::optional<TensorView>& weight,
                      const std::optional<TensorView>& wsum, const std::optional<TensorView>& scale,
                      const std::optional<TensorView>& d_hidden);
void lce_chunk_update_cuda(const TensorView& logits, const std::optional<TensorView>& bias, const TensorView& targets,
                           int64_t col0, int64_t vocab, const LceOptions& opt, const TensorView& state,
                           const TensorView& argmax, const std::optional<TensorView>& exp_out,
                           const std::optional<TensorView>& acc, int64_t stream);
void lce_chunk_grad_cuda(const TensorView& logits, const std::optional<TensorView>& bias, const TensorView& targets,
                         int64_t col0, int64_t vocab, const LceOptions& opt, const TensorView& lse,
                         const TensorView& coef, const TensorView& grad_out, int64_t stream);
void lce_finalize_cuda(const TensorView& state, const TensorView& argmax, const TensorView& targets, int64_t vocab,
                       const LceOptions& opt, const TensorView& loss, const TensorView& lse, const TensorView& hit,
                       const std::optional<TensorView>& acc, const std::optional<TensorView>& weight,
                       const std::optional<TensorView>& wsum, const std::optional<TensorView>& scale,
                       const std::optional<TensorView>& d_hidden, int64_t stream);

}  // namespace kindred
