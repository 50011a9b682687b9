// Validation and device dispatch of the tokens family. Structural checks (dtypes, shapes, devices) come first;
// value checks that need a pass over index arrays are done here too where the data is on the CPU.
#include "kindred/tokens.h"

#include <tuple>
#include <utility>
#include "kindred/dispatch.h"

namespace kindred {
namespace {

void check_1d(const TensorView& t, const char* name, DType dtype, int64_t n) {
  check_dtype(t, name, {dtype});
  check_contiguous(t, name);
  check_shape(t, name, {n});
}

constexpr const char* kPrep = "data preparation runs there";

int64_t count_of(const TensorView& t, const char* name) {
  KINDRED_CHECK(t.dim() == 1 && t.shape[0] >= 1, name, " must be 1-D with at least one element (offsets [n + 1]), got ",
                t.describe());
  return t.shape[0] - 1;
}

// offsets i64 [n + 1] on the CPU: starts at 0, non-decreasing, ends at `last`.
void check_offsets(const TensorView& t, const char* name, int64_t last) {
  check_dtype(t, name, {DType::i64});
  check_contiguous(t, name);
  check_cpu(t, name, kPrep);
  const int64_t n = count_of(t, name);
  const int64_t* o = t.ptr<int64_t>();
  KINDRED_CHECK(o[0] == 0, name, "[0] must be 0, got ", o[0]);
  for (int64_t i = 0; i < n; ++i)
    KINDRED_CHECK(o[i + 1] >= o[i], name, " must be non-decreasing, got ", name, "[", i, "] = ", o[i], " > ", name, "[",
                  i + 1, "] = ", o[i + 1]);
  KINDRED_CHECK(o[n] == last, name, "[", n, "] must be ", last, ", got ", o[n]);
}

// The last element of offsets i64 [n + 1] on the CPU.
int64_t last_offset(const TensorView& t, const char* name) {
  check_dtype(t, name, {DType::i64});
  check_contiguous(t, name);
  check_cpu(t, name, kPrep);
  return t.ptr<int64_t>()[count_of(t, name)];
}

}  // namespace

void count_tokens(const SegmentedTokens& in, const TokenCounts& out) {
  check_dtype(in.ids, "ids", {DType::i32});
  check_contiguous(in.ids, "ids");
  check_cpu(in.ids, "ids", kPrep);
  KINDRED_CHECK(in.ids.dim() == 1, "ids must be 1-D [T], got ", in.ids.describe());
  const int64_t t = in.ids.numel();
  const int64_t s = count_of(in.seg_offsets, "seg_offsets");
  check_offsets(in.seg_offsets, "seg_offsets", t);
  for (auto [v, name, dt] :
       {std::tuple{&in.seg_trainable, "seg_trainable", DType::u8}, std::tuple{&in.seg_turn, "seg_turn", DType::i32},
        std::tuple{&in.seg_exchange, "seg_exchange", DType::i32}}) {
    check_1d(*v, name, dt, s);
    check_cpu(*v, name, kPrep);
  }
  const int64_t n = count_of(in.example_segs, "example_segs");
  check_offsets(in.example_segs, "example_segs", s);
  KINDRED_CHECK(in.turn_offsets.dim() == 1 && in.turn_offsets.shape[0] == n + 1, "turn_offsets must have ", n + 1,
                " elements (one more than examples), got ", in.turn_offsets.describe());
  KINDRED_CHECK(in.exchange_offsets.dim() == 1 && in.exchange_offsets.shape[0] == n + 1, "exchange_offsets must have ",
                n + 1, " elements (one more than examples), got ", in.exchange_offsets.describe());
  const int64_t turns = last_offset(in.turn_offsets, "turn_offsets");
  const int64_t exchanges = last_offset(in.exchange_offsets, "exchange_offsets");
  check_offsets(in.turn_offsets, "turn_offsets", turns);
  check_offsets(in.exchange_offsets, "exchange_offsets", exchanges);
  // Every segment's turn / exchange index lies within its example's slice.
  const int64_t* es = in.example_segs.ptr<int64_t>();
  const int64_t* to = in.turn_offsets.ptr<int64_t>();
  const int64_t* xo = in.exchange_offsets.ptr<int64_t>();
  const int32_t* turn = in.seg_turn.ptr<int32_t>();
  const int32_t* exch = in.seg_exchange.ptr<int32_t>();
  for (int64_t e = 0; e < n; ++e) {
    const int64_t nt = to[e + 1] - to[e], nx = xo[e + 1] - xo[e];
    for (int64_t g = es[e]; g < es[e + 1]; ++g) {
      KINDRED_CHECK(turn[g] >= -1 && turn[g] < nt, "seg_turn[", g, "] = ", turn[g], " is outside example ", e, "'s ",
                    nt, " turns");
      KINDRED_CHECK(exch[g] >= -1 && exch[g] < nx, "seg_exchange[", g, "] = ", exch[g], " is outside example ", e,
                    "'s ", nx, " exchanges");
    }
  }
  check_1d(out.labels, "labels", DType::i32, t);
  for (auto [v, name] :
       {std::pair{&out.example_tokens, "example_tokens"}, std::pair{&out.example_trainable, "example_trainable"},
        std::pair{&out.example_fixed, "example_fixed"}})
    check_1d(*v, name, DType::i32, n);
  check_1d(out.turn_tokens, "turn_tokens", DType::i32, turns);
  check_1d(out.turn_trainable, "turn_trainable", DType::i32, turns);
  check_1d(out.exchange_tokens, "exchange_tokens", DType::i32, exchanges);
  check_1d(out.exchange_trainable, "exchange_trainable", DType::i32, exchanges);
  for (const TensorView* v : {&out.labels, &out.example_tokens, &out.turn_tokens, &out.exchange_tokens})
    check_cpu(*v, "outputs", kPrep);
  count_tokens_cpu(in, out);
}

void apply_budget(const BudgetInput& in, int64_t budget, BudgetPolicy policy, const BudgetOutput& out) {
  KINDRED_CHECK(budget >= 1, "budget must be a positive number of tokens, got ", budget);
  KINDRED_CHECK(policy == BudgetPolicy::error || policy == BudgetPolicy::drop || policy == BudgetPolicy::truncate,
                "policy must be error, drop or truncate, got ", static_cast<int>(policy));
  KINDRED_CHECK(in.example_tokens.dim() == 1, "example_tokens must be 1-D [N], got ", in.example_tokens.describe());
  const int64_t n = in.example_tokens.numel();
  check_1d(in.example_tokens, "example_tokens", DType::i32, n);
  check_1d(in.example_fixed, "example_fixed", DType::i32, n);
  KINDRED_CHECK(in.exchange_offsets.dim() == 1 && in.exchange_offsets.shape[0] == n + 1, "exchange_offsets must have ",
                n + 1, " elements, got ", in.exchange_offsets.describe());
  KINDRED_CHECK(in.exchange_tokens.dim() == 1, "exchange_tokens must be 1-D [E], got ", in.exchange_tokens.describe());
  check_offsets(in.exchange_offsets, "exchange_offsets", in.exchange_tokens.numel());
  check_1d(in.exchange_tokens, "exchange_tokens", DType::i32, in.exchange_tokens.numel());
  for (auto [v, name] : {std::pair{&out.action, "action"}, std::pair{&out.drop_exchanges, "drop_exchanges"},
                         std::pair{&out.tokens_after, "tokens_after"}})
    check_1d(*v, name, DType::i32, n);
  for (const TensorView* v : {&in.example_tokens, &in.example_fixed, &in.exchange_tokens, &out.action,
                              &out.drop_exchanges, &out.tokens_after})
    check_cpu(*v, "budget arrays", kPrep);
  apply_budget_cpu(in, budget, policy, out);
}

int64_t pack_bfd(const TensorView& lengths, int64_t max_tokens, const TensorView& row, const TensorView& start) {
  KINDRED_CHECK(max_tokens >= 1 && max_tokens <= (int64_t{1} << 24), "max_tokens must be in [1, 2^24], got ",
                max_tokens);
  KINDRED_CHECK(lengths.dim() == 1, "lengths must be 1-D [N], got ", lengths.describe());
  const int64_t n = lengths.numel();
  check_1d(lengths, "lengths", DType::i32, n);
  check_1d(row, "row", DType::i32, n);
  check_1d(start, "start", DType::i32, n);
  for (auto [v, name] : {std::pair{&lengths, "lengths"}, std::pair{&row, "row"}, std::pair{&start, "start"}})
    check_cpu(*v, name, kPrep);
  const int32_t* len = lengths.ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i)
    KINDRED_CHECK(len[i] >= 1 && len[i] <= max_tokens, "lengths[", i, "] = ", len[i],
                  " must be in [1, max_tokens = ", max_tokens, "] (apply the budget policy before packing)");
  return pack_bfd_cpu(lengths, max_tokens, row, start);
}

void pack_rows(const TensorView& ids, const TensorView& labels, const TensorView& example_offsets,
               const TensorView& row, const TensorView& start, int32_t pad_id, const PackedRows& out) {
  KINDRED_CHECK(ids.dim() == 1, "ids must be 1-D [T], got ", ids.describe());
  const int64_t t = ids.numel();
  check_1d(ids, "ids", DType::i32, t);
  check_1d(labels, "labels", DType::i32, t);
  const int64_t n = count_of(example_offsets, "example_offsets");
  check_offsets(example_offsets, "example_offsets", t);
  check_1d(row, "row", DType::i32, n);
  check_1d(start, "start", DType::i32, n);
  KINDRED_CHECK(out.input_ids.dim() == 2, "input_ids must be 2-D [rows, max_tokens], got ", out.input_ids.describe());
  const int64_t r = out.input_ids.shape[0], l = out.input_ids.shape[1];
  KINDRED_CHECK(l >= 1, "rows must have at least one token, got ", out.input_ids.describe());
  for (auto [v, name] : {std::pair{&out.input_ids, "input_ids"}, std::pair{&out.labels, "labels out"},
                         std::pair{&out.position_ids, "position_ids"}}) {
    check_dtype(*v, name, {DType::i32});
    check_contiguous(*v, name);
    check_shape(*v, name, {r, l});
  }
  check_1d(out.row_trainable, "row_trainable", DType::i32, r);
  check_1d(out.row_seqs, "row_seqs", DType::i64, r + 1);
  KINDRED_CHECK(out.cu_seqlens.dim() == 1 && out.cu_seqlens.shape[0] >= n + 1, "cu_seqlens must be 1-D with ",
                "N + padded rows + 1 elements, got ", out.cu_seqlens.describe());
  check_1d(out.cu_seqlens, "cu_seqlens", DType::i32, out.cu_seqlens.shape[0]);
  check_1d(out.seq_example, "seq_example", DType::i32, out.cu_seqlens.shape[0] - 1);
  KINDRED_CHECK(r * l < (int64_t{1} << 31), "rows × max_tokens = ", r * l,
                " does not fit the int32 cu_seqlens; pack fewer examples at a time");
  for (const TensorView* v : {&ids, &labels, &row, &start, &out.input_ids, &out.labels, &out.position_ids,
                              &out.cu_seqlens, &out.seq_example, &out.row_seqs, &out.row_trainable})
    check_cpu(*v, "packing arrays", kPrep);
  pack_rows_cpu(ids, labels, example_offsets, row, start, pad_id, out);
}

namespace {

// Returns the number of rows of labels ([R, L] or [T]).
int64_t check_labels(const TensorView& labels) {
  check_dtype(labels, "labels", {DType::i32, DType::i64});
  check_contiguous(labels, "labels");
  KINDRED_CHECK(labels.dim() == 1 || labels.dim() == 2, "labels must be [rows, row_length] or [tokens], got ",
                labels.describe());
  return labels.dim() == 2 ? labels.shape[0] : 1;
}

int64_t check_cu_seqlens(const TensorView& cu, const TensorView& other, const char* other_name) {
  check_dtype(cu, "cu_seqlens", {DType::i32});
  check_contiguous(cu, "cu_seqlens");
  const int64_t q = count_of(cu, "cu_seqlens");
  check_same_device(cu, "cu_seqlens", other, other_name);
  return q;
}

}  // namespace

void count_trainable(const TensorView& labels, const TensorView& cu_seqlens, const TensorView& seq_trainable,
                     const TensorView& row_trainable, const TensorView& total, [[maybe_unused]] int64_t stream) {
  const int64_t rows = check_labels(labels);
  const int64_t q = check_cu_seqlens(cu_seqlens, labels, "labels");
  check_1d(seq_trainable, "seq_trainable", DType::i32, q);
  check_1d(row_trainable, "row_trainable", DType::i32, rows);
  check_1d(total, "total", DType::i32, 1);
  for (auto [v, name] : {std::pair{&seq_trainable, "seq_trainable"}, std::pair{&row_trainable, "row_trainable"},
                         std::pair{&total, "total"}})
    check_same_device(*v, name, labels, "labels");
  KINDRED_CHECK(labels.numel() < (int64_t{1} << 31), "labels has ", labels.numel(),
                " tokens; int32 cu_seqlens address at most 2^31 - 1");
  if (labels.device == Device::cpu) return count_trainable_cpu(labels, cu_seqlens, seq_trainable, row_trainable, total);
  KINDRED_CALL_CUDA(count_trainable, labels, cu_seqlens, seq_trainable, row_trainable, total, stream);
}

void position_ids(const TensorView& cu_seqlens, const TensorView& out, [[maybe_unused]] int64_t stream) {
  check_dtype(out, "out", {DType::i32, DType::i64});
  check_contiguous(out, "out");
  check_cu_seqlens(cu_seqlens, out, "out");
  KINDRED_CHECK(out.numel() < (int64_t{1} << 31), "out has ", out.numel(),
                " tokens; int32 cu_seqlens address at most 2^31 - 1");
  if (out.device == Device::cpu) return position_ids_cpu(cu_seqlens, out);
  KINDRED_CALL_CUDA(position_ids, cu_seqlens, out, stream);
}

}  // namespace kindred
