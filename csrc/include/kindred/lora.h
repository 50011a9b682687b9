// The lora op family: y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ (+ bias) over a frozen W, and its gradients.
// Shapes: x [M, K], W [N, K], A [r, K] (PEFT's lora_A.weight), B [N, r] (lora_B.weight), 1 <= r <= min(K, N).
// `lora_linear` / `lora_linear_backward` are the CPU reference (Eigen, templated on the scalar; float64 inputs are
// computed in float64). On CUDA, kindred composes cuBLAS GEMMs (python/kindred/_ops_lora.py) around the one
// kernel of its own here, `lora_dropout`, whose mask is the same bit for bit on CPU and CUDA.
// All buffers are allocated by the caller.
#pragma once

#include <optional>

#include "kindred/common.h"

namespace kindred {

// Dropout on the LoRA input: keep(m, k) is a counter hash of (seed, m·K + k), so a mask is reproducible
// from its 64-bit seed on any device and never stored; kept values are scaled by 1 / (1 − p).
struct LoraDropout {
  double p = 0.0;                  // drop probability in [0, 1)
  std::optional<TensorView> seed;  // int32 [2] (low, high word) on the data's device; required when p > 0
  bool active() const { return p > 0.0; }
};

// splitmix64's finalizer over seed + golden-ratio stride · (index + 1): a counter-based generator (as Philox
// is), so element i needs no state from element i − 1.
KINDRED_HD uint32_t lora_dropout_bits(uint64_t seed, uint64_t index) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * (index + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<uint32_t>(z >> 32);
}

// Element `index` is kept when its bits are >= threshold = round(p · 2^32).
inline uint64_t lora_dropout_threshold(double p) {
  const double t = p * 4294967296.0 + 0.5;
  return t >= 4294967295.0 ? 4294967295ull : static_cast<uint64_t>(t);
}

KINDRED_HD bool lora_keep(uint64_t seed, uint64_t index, uint64_t threshold) {
  return lora_dropout_bits(seed, index) >= threshold;
}

// out = drop(x) (or out += drop(x) with `accumulate`); x, out: float [M, K] of one dtype, unit column
// stride, rows possibly strided. The mask index is the logical m·K + k whatever the strides.
void lora_dropout(const TensorView& x, const LoraDropout& dropout, const TensorView& out, bool accumulate,
                  int64_t stream);

// y [M, N] = x·Wᵀ + s·drop(x)·Aᵀ·Bᵀ (+ bias [N]); xs [M, r] = s·drop(x)·Aᵀ (what the backward needs).
// W may have strided rows (row stride >= K, unit column stride); everything else is contiguous; all of one
// float dtype on the CPU.
void lora_linear(const TensorView& x, const TensorView& w, const TensorView& a, const TensorView& b,
                 const std::optional<TensorView>& bias, double scaling, const LoraDropout& dropout, const TensorView& y,
                 const TensorView& xs);

// From dy [M, N]: g = dy·B, dx [M, K] = dy·W + s·drop'(g·A) (the A path's gradient goes through the same
// mask), da [r, K] = s·gᵀ·drop(x), db [N, r] = s·dyᵀ·(drop(x)·Aᵀ).
void lora_linear_backward(const TensorView& dy, const TensorView& x, const TensorView& w, const TensorView& a,
                          const TensorView& b, double scaling, const LoraDropout& dropout, const TensorView& dx,
                          const TensorView& da, const TensorView& db);

void lora_dropout_cpu(const TensorView& x, const LoraDropout& dropout, const TensorView& out, bool accumulate);
void lora_linear_cpu(const TensorView& x, const TensorView& w, const TensorView& a, const TensorView& b,
                     const std::optional<TensorView>& bias, double scaling, const LoraDropout& dropout,
                     const TensorView& y, const TensorView& xs);
void lora_linear_backward_cpu(const TensorView& dy, const TensorView& x, const TensorView& w, const TensorView& a,
                              const TensorView& b, double scaling, const LoraDropout& dropout, const TensorView& dx,
                              const TensorView& da, const TensorView& db);

void lora_dropout_cuda(const TensorView& x, const LoraDropout& dropout, const TensorView& out, bool accumulate,
                       int64_t stream);

}  // namespace kindred
