// Validation and device dispatch of the loss family (kindred/loss.h).
#include "kindred/loss.h"

#include <cmath>

#include "kindred/dispatch.h"

namespace kindred {
namespace {

constexpr std::initializer_list<DType> kFloat = {DType::f32, DType::f16, DType::bf16, DType::f64};

void check_tensor(const TensorView& t, const char* name, std::initializer_list<DType> dtypes,
                  const std::vector<int64_t>& shape, const TensorView& like, const char* like_name) {
  check_dtype(t, name, dtypes);
  check_shape(t, name, shape);
  check_contiguous(t, name);
  check_same_device(t, name, like, like_name);
}

void check_options(const LceOptions& o) {
  KINDRED_CHECK(std::isfinite(o.label_smoothing) && o.label_smoothing >= 0.0 && o.label_smoothing <= 1.0,
                "label_smoothing must be in [0, 1], got ", o.label_smoothing);
  KINDRED_CHECK(std::isfinite(o.z_loss) && o.z_loss >= 0.0, "z_loss must be finite and >= 0, got ", o.z_loss);
  KINDRED_CHECK(std::isfinite(o.softcap) && o.softcap >= 0.0, "softcap must be finite and > 0 (0: none), got ",
                o.softcap);
}

// Checks hidden [N, D], weight [V, D], bias [V], targets i32 [N]; returns {N, D, V}.
struct Dims {
  int64_t n, d, v;
};
Dims check_inputs(const TensorView& hidden, const TensorView& weight, const std::optional<TensorView>& bias,
                  const TensorView& targets, const LceOptions& opt) {
  check_options(opt);
  KINDRED_CHECK(hidden.dim() == 2, "hidden must be 2-D [tokens, hidden_size], got ", hidden.describe());
  KINDRED_CHECK(weight.dim() == 2, "weight must be 2-D [vocab, hidden_size], got ", weight.describe());
  const Dims dims{hidden.shape[0], hidden.shape[1], weight.shape[0]};
  KINDRED_CHECK(dims.d > 0 && dims.v > 0, "weight must have a non-empty shape, got ", weight.describe());
  check_dtype(hidden, "hidden", kFloat);
  check_contiguous(hidden, "hidden");
  KINDRED_CHECK(weight.dtype == hidden.dtype, "weight must have hidden's dtype ", dtype_name(hidden.dtype), ", got ",
                weight.describe());
  check_tensor(weight, "weight", kFloat, {dims.v, dims.d}, hidden, "hidden");
  if (bias) {
    KINDRED_CHECK(bias->dtype == hidden.dtype, "bias must have hidden's dtype ", dtype_name(hidden.dtype), ", got ",
                  bias->describe());
    check_tensor(*bias, "bias", kFloat, {dims.v}, hidden, "hidden");
  }
  check_tensor(targets, "targets", {DType::i32}, {dims.n}, hidden, "hidden");
  return dims;
}

// Throws naming the first target outside [0, V) that is not ignore_index (CPU only: no device sync).
void check_target_range(const TensorView& targets, int64_t vocab, int64_t ignore_index) {
  const int32_t* y = targets.ptr<int32_t>();
  for (int64_t i = 0; i < targets.numel(); ++i)
    KINDRED_CHECK(y[i] == ignore_index || (y[i] >= 0 && y[i] < vocab), "targets[", i, "] = ", y[i], " is outside [0, ",
                  vocab, ") and is not ignore_index (", ignore_index, ")");
}

DType loss_dtype(const TensorView& hidden) {
  return hidden.dtype == DType::f64 ? DType::f64 : DType::f32;
}

constexpr const char* kReference =
    "linear_cross_entropy here is the CPU reference; on CUDA the loss runs as chunked GEMMs and lce_* kernels "
    "(kindred.ops.linear_cross_entropy)";

// Checks the arguments shared by the chunk steps; returns {T, C}.
std::pair<int64_t, int64_t> check_chunk(const TensorView& logits, const std::optional<TensorView>& bias,
                                        const TensorView& targets, int64_t col0, int64_t vocab, const LceOptions& opt) {
  check_options(opt);
  KINDRED_CHECK(logits.dim() == 2, "logits must be 2-D [rows, chunk], got ", logits.describe());
  const int64_t t = logits.shape[0], c = logits.shape[1];
  check_tensor(logits, "logits", {DType::f32}, {t, c}, logits, "logits");
  KINDRED_CHECK(col0 >= 0 && c >= 0 && col0 + c <= vocab, "the chunk [", col0, ", ", col0 + c,
                ") must lie in the vocabulary [0, ", vocab, ")");
  if (bias) check_tensor(*bias, "bias", {DType::f32, DType::f16, DType::bf16}, {c}, logits, "logits");
  check_tensor(targets, "targets", {DType::i32}, {t}, logits, "logits");
  return {t, c};
}

// out must cover logits' memory row by row (written in place over it).
void check_aliases_logits(const TensorView& out, const char* name, const TensorView& logits) {
  check_dtype(out, name, {DType::f32, DType::f16, DType::bf16});
  KINDRED_CHECK(out.dim() == 2 && out.shape == logits.shape && (out.shape[1] <= 1 || out.strides[1] == 1), name,
                " must be a [", logits.shape[0], ", ", logits.shape[1], "] view with unit column stride, got ",
                out.describe());
  const bool same_rows = out.shape[0] <= 1 || out.strides[0] * dtype_size(out.dtype) == logits.strides[0] * 4;
  KINDRED_CHECK(out.data == logits.data && same_rows, name, " must alias logits row by row (each row written in ",
                "place over the same row of logits)");
  check_same_device(out, name, logits, "logits");
}

}  // namespace

void linear_cross_entropy(const TensorView& hidden, const TensorView& weight, const std::optional<TensorView>& bias,
                          const TensorView& targets, const LceOptions& opt, const TensorView& loss,
                          const TensorView& lse, const TensorView& hit) {
  check_cpu(hidden, "hidden", kReference);
  const Dims dims = check_inputs(hidden, weight, bias, targets, opt);
  const DType ld = loss_dtype(hidden);
  check_tensor(loss, "loss", {ld}, {dims.n}, hidden, "hidden");
  check_tensor(lse, "lse", {ld}, {dims.n}, hidden, "hidden");
  check_tensor(hit, "hit", {DType::u8}, {dims.n}, hidden, "hidden");
  check_target_range(targets, dims.v, opt.ignore_index);
  linear_cross_entropy_cpu(hidden, weight, bias, targets, opt, loss, lse, hit);
}

void linear_cross_entropy_backward(const TensorView& hidden, const TensorView& weight,
                                   const std::optional<TensorView>& bias, const TensorView& targets,
                                   const TensorView& lse, const TensorView& coef, const LceOptions& opt,
                                   const std::optional<TensorView>& d_hidden, const std::optional<TensorView>& d_weight,
                                   const std::optional<TensorView>& d_bias) {
  check_cpu(hidden, "hidden", kReference);
  const Dims dims = check_inputs(hidden, weight, bias, targets, opt);
  const DType ld = loss_dtype(hidden);
  check_tensor(lse, "lse", {ld}, {dims.n}, hidden, "hidden");
  check_tensor(coef, "coef", {ld}, {dims.n}, hidden, "hidden");
  if (d_hidden) check_tensor(*d_hidden, "d_hidden", {hidden.dtype}, {dims.n, dims.d}, hidden, "hidden");
  if (d_weight) check_tensor(*d_weight, "d_weight", {hidden.dtype}, {dims.v, dims.d}, hidden, "hidden");
  if (d_bias) {
    KINDRED_CHECK(bias.has_value(), "d_bias needs a bias");
    check_tensor(*d_bias, "d_bias", {hidden.dtype}, {dims.v}, hidden, "hidden");
  }
  check_target_range(targets, dims.v, opt.ignore_index);
  linear_cross_entropy_backward_cpu(hidden, weight, bias, targets, lse, coef, opt, d_hidden, d_weight, d_bias);
}

void lce_chunk_update(const TensorView& logits, const std::optional<TensorView>& bias, const TensorView& targets,
                      int64_t col0, int64_t vocab, const LceOptions& opt, const TensorView& state,
                      const TensorView& argmax, const std::optional<TensorView>& exp_out,
                      const std::optional<TensorView>& acc, [[maybe_unused]] int64_t stream) {
  const auto [t, c] = check_chunk(logits, bias, targets, col0, vocab, opt);
  check_tensor(state, "state", {DType::f32}, {t, kLceStateCols}, logits, "logits");
  check_tensor(argmax, "argmax", {DType::i32}, {t}, logits, "logits");
  KINDRED_CHECK(exp_out.has_value() == acc.has_value(), "the single pass needs exp_out and acc together");
  if (exp_out) {
    check_aliases_logits(*exp_out, "exp_out", logits);
    KINDRED_CHECK(acc->dim() == 2, "acc must be 2-D [rows, hidden_size], got ", acc->describe());
    check_tensor(*acc, "acc", {DType::f32}, {t, acc->shape[1]}, logits, "logits");
  }
  if (logits.device == Device::cpu)
    return lce_chunk_update_cpu(logits, bias, targets, col0, vocab, opt, state, argmax, exp_out, acc);
  KINDRED_CALL_CUDA(lce_chunk_update, logits, bias, targets, col0, vocab, opt, state, argmax, exp_out, acc, stream);
}

void lce_chunk_grad(const TensorView& logits, const std::optional<TensorView>& bias, const TensorView& targets,
                    int64_t col0, int64_t vocab, const LceOptions& opt, const TensorView& lse, const TensorView& coef,
                    const TensorView& grad_out, [[maybe_unused]] int64_t stream) {
  const auto [t, c] = check_chunk(logits, bias, targets, col0, vocab, opt);
  check_tensor(lse, "lse", {DType::f32}, {t}, logits, "logits");
  check_tensor(coef, "coef", {DType::f32}, {t}, logits, "logits");
  check_aliases_logits(grad_out, "grad_out", logits);
  if (logits.device == Device::cpu)
    return lce_chunk_grad_cpu(logits, bias, targets, col0, vocab, opt, lse, coef, grad_out);
  KINDRED_CALL_CUDA(lce_chunk_grad, logits, bias, targets, col0, vocab, opt, lse, coef, grad_out, stream);
}

void lce_finalize(const TensorView& state, const TensorView& argmax, const TensorView& targets, int64_t vocab,
                  const LceOptions& opt, const TensorView& loss, const TensorView& lse, const TensorView& hit,
                  const std::optional<TensorView>& acc, const std::optional<TensorView>& weight,
                  const std::optional<TensorView>& wsum, const std::optional<TensorView>& scale,
                  const std::optional<TensorView>& d_hidden, [[maybe_unused]] int64_t stream) {
  check_options(opt);
  KINDRED_CHECK(state.dim() == 2, "state must be 2-D [rows, ", int(kLceStateCols), "], got ", state.describe());
  const int64_t t = state.shape[0];
  KINDRED_CHECK(vocab > 0, "vocab must be positive, got ", vocab);
  check_tensor(state, "state", {DType::f32}, {t, kLceStateCols}, state, "state");
  check_tensor(argmax, "argmax", {DType::i32}, {t}, state, "state");
  check_tensor(targets, "targets", {DType::i32}, {t}, state, "state");
  check_tensor(loss, "loss", {DType::f32}, {t}, state, "state");
  check_tensor(lse, "lse", {DType::f32}, {t}, state, "state");
  check_tensor(hit, "hit", {DType::u8}, {t}, state, "state");
  const bool single = acc || weight || scale || d_hidden || wsum;
  if (single) {
    KINDRED_CHECK(acc && weight && scale && d_hidden, "the single pass needs acc, weight, scale and d_hidden");
    KINDRED_CHECK(weight->dim() == 2 && weight->shape[0] == vocab, "weight must be [", vocab, ", hidden_size], got ",
                  weight->describe());
    const int64_t d = weight->shape[1];
    check_tensor(*weight, "weight", {DType::f32, DType::f16, DType::bf16}, {vocab, d}, state, "state");
    check_tensor(*acc, "acc", {DType::f32}, {t, d}, state, "state");
    check_tensor(*scale, "scale", {DType::f32}, {1}, state, "state");
    check_tensor(*d_hidden, "d_hidden", {weight->dtype}, {t, d}, state, "state");
    KINDRED_CHECK(!(opt.label_smoothing > 0.0 && opt.softcap > 0.0),
                  "the single pass does not combine label_smoothing with softcap (use the two-pass path)");
    KINDRED_CHECK(opt.label_smoothing == 0.0 || wsum.has_value(), "label_smoothing > 0 needs wsum");
    if (wsum) check_tensor(*wsum, "wsum", {DType::f32}, {d}, state, "state");
  }
  if (state.device == Device::cpu)
    return lce_finalize_cpu(state, argmax, targets, vocab, opt, loss, lse, hit, acc, weight, wsum, scale, d_hidden);
  KINDRED_CALL_CUDA(lce_finalize, state, argmax, targets, vocab, opt, loss, lse, hit, acc, weight, wsum, scale,
                    d_hidden, stream);
}

}  // namespace kindred
