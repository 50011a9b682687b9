// The tokens op family: token accounting of tokenized chat examples (counts, assistant-only labels, budget
// policy), best-fit-decreasing packing into fixed-length rows, and the two ops training needs on the device
// (trainable-token counts per sequence / row, position ids from cu_seqlens). Each op is declared once;
// `<op>` validates and dispatches to `<op>_cpu` (csrc/cpu/tokens_cpu.cpp) or `<op>_cuda`
// (kernels/tokens/tokens_cuda.cu). All buffers are allocated by the caller.
//
// Label convention (Hugging Face's): labels[t] = ids[t] where token t is trained, kIgnoreIndex elsewhere; the
// loss shifts (logits at t predict labels[t + 1]). Trained = assistant content and its end-of-turn token.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "kindred/common.h"

namespace kindred {

// ---------------------------------------------------------------------------------------------------------
// Accounting. N examples, each a run of segments (a rendered chat template yields segments with a role, so
// the mask is known by construction); S segments tile the T tokens in order.
struct SegmentedTokens {
  TensorView ids;               // i32 [T], all examples' tokens back to back
  TensorView seg_offsets;       // i64 [S + 1], token offset of each segment: 0 = first ≤ ... ≤ last = T
  TensorView seg_trainable;     // u8 [S], 1 where the segment's tokens are trained
  TensorView seg_turn;          // i32 [S], message index within its example, −1 for template-only tokens
  TensorView seg_exchange;      // i32 [S], exchange (user + assistant turn) within its example, −1 = fixed
                                // (template prefix/suffix and the system prompt: kept by truncation)
  TensorView example_segs;      // i64 [N + 1], segment offset of each example
  TensorView turn_offsets;      // i64 [N + 1], each example's slice of the per-turn outputs
  TensorView exchange_offsets;  // i64 [N + 1], each example's slice of the per-exchange outputs
};

struct TokenCounts {
  TensorView labels;              // i32 [T]
  TensorView example_tokens;      // i32 [N]
  TensorView example_trainable;   // i32 [N]
  TensorView example_fixed;       // i32 [N], tokens outside every exchange
  TensorView turn_tokens;         // i32 [turn_offsets[N]]
  TensorView turn_trainable;      // i32 [turn_offsets[N]]
  TensorView exchange_tokens;     // i32 [exchange_offsets[N]]
  TensorView exchange_trainable;  // i32 [exchange_offsets[N]]
};

void count_tokens(const SegmentedTokens& in, const TokenCounts& out);
void count_tokens_cpu(const SegmentedTokens& in, const TokenCounts& out);

// ---------------------------------------------------------------------------------------------------------
// Budget policy for examples longer than `budget` tokens:
//   error    -> action kOver (the caller raises, naming the examples);
//   drop     -> action kDrop;
//   truncate -> drop whole exchanges from the front, keeping the fixed tokens (system prompt), until the
//               example fits: action kTruncate with drop_exchanges = how many; kDrop when even the last
//               exchange alone does not fit.
enum class BudgetPolicy : int { error = 0, drop = 1, truncate = 2 };
enum BudgetAction : int32_t { kKeep = 0, kTruncate = 1, kDrop = 2, kOver = 3 };

struct BudgetInput {
  TensorView example_tokens;    // i32 [N]
  TensorView example_fixed;     // i32 [N]
  TensorView exchange_tokens;   // i32 [E]
  TensorView exchange_offsets;  // i64 [N + 1]
};
struct BudgetOutput {
  TensorView action;          // i32 [N], a BudgetAction
  TensorView drop_exchanges;  // i32 [N], leading exchanges removed (kTruncate), else 0
  TensorView tokens_after;    // i32 [N], tokens after the action (0 when dropped)
};

void apply_budget(const BudgetInput& in, int64_t budget, BudgetPolicy policy, const BudgetOutput& out);
void apply_budget_cpu(const BudgetInput& in, int64_t budget, BudgetPolicy policy, const BudgetOutput& out);

// ---------------------------------------------------------------------------------------------------------
// Best-fit-decreasing packing of N examples (lengths i32 [N], each in [1, max_tokens]) into rows of
// max_tokens: longest first (ties by index), each into the open row with the least room that still fits it,
// else a new row. Writes row i32 [N] and start i32 [N] (offset within the row); returns the number of rows.
// O(N + max_tokens) sort plus O(log max_tokens) per example.
int64_t pack_bfd(const TensorView& lengths, int64_t max_tokens, const TensorView& row, const TensorView& start);
int64_t pack_bfd_cpu(const TensorView& lengths, int64_t max_tokens, const TensorView& row, const TensorView& start);

// Gathers packed rows from examples (ids/labels i32 [T], example_offsets i64 [N + 1]) placed by pack_bfd.
// Rows are L = max_tokens long: examples at their start, the tail padded with pad_id / kIgnoreIndex.
// Every example is one sequence; each row's padding tail (if any) one more, so cu_seqlens tiles the
// flattened R × L tokens (varlen attention sees the padding as its own sequence). The first label of every
// sequence is kIgnoreIndex (no target crosses a sequence start). Position ids restart at 0 per sequence.
struct PackedRows {
  TensorView input_ids;      // i32 [R, L]
  TensorView labels;         // i32 [R, L]
  TensorView position_ids;   // i32 [R, L]
  TensorView cu_seqlens;     // i32 [Q + 1], Q = N + rows with padding
  TensorView seq_example;    // i32 [Q], example index of each sequence, −1 for padding
  TensorView row_seqs;       // i64 [R + 1], each row's slice of the sequences
  TensorView row_trainable;  // i32 [R], labels != kIgnoreIndex per row
};

void pack_rows(const TensorView& ids, const TensorView& labels, const TensorView& example_offsets,
               const TensorView& row, const TensorView& start, int32_t pad_id, const PackedRows& out);
void pack_rows_cpu(const TensorView& ids, const TensorView& labels, const TensorView& example_offsets,
                   const TensorView& row, const TensorView& start, int32_t pad_id, const PackedRows& out);

// ---------------------------------------------------------------------------------------------------------
// Device ops for training. labels: i32/i64 [R, L] (or [T]: one row), contiguous; cu_seqlens: i32 [Q + 1]
// from 0 to R·L, non-decreasing, no sequence crossing a row boundary (checked on the CPU; on the GPU a
// malformed cu_seqlens gives wrong counts but no out-of-bounds access, and nothing syncs with the host).
// Writes seq_trainable i32 [Q], row_trainable i32 [R], total i32 [1]: labels != kIgnoreIndex.
void count_trainable(const TensorView& labels, const TensorView& cu_seqlens, const TensorView& seq_trainable,
                     const TensorView& row_trainable, const TensorView& total, int64_t stream);
void count_trainable_cpu(const TensorView& labels, const TensorView& cu_seqlens, const TensorView& seq_trainable,
                         const TensorView& row_trainable, const TensorView& total);
void count_trainable_cuda(const TensorView& labels, const TensorView& cu_seqlens, const TensorView& seq_trainable,
                          const TensorView& row_trainable, const TensorView& total, int64_t stream);

// out: i32/i64 [T] (any shape of T elements), T = cu_seqlens[Q]: t − cu_seqlens[q] for t in sequence q.
void position_ids(const TensorView& cu_seqlens, const TensorView& out, int64_t stream);
void position_ids_cpu(const TensorView& cu_seqlens, const TensorView& out);
void position_ids_cuda(const TensorView& cu_seqlens, const TensorView& out, int64_t stream);

// ---------------------------------------------------------------------------------------------------------
// SentencePiece tokenizer through the sentencepiece C++ library (compiled when the build found it).
bool sentencepiece_compiled();

class SentencePieceTokenizer {
 public:
  // Throws an input Error naming `path` when the file is missing or not a sentencepiece model.
  explicit SentencePieceTokenizer(const std::string& path);
  ~SentencePieceTokenizer();
  SentencePieceTokenizer(const SentencePieceTokenizer&) = delete;
  SentencePieceTokenizer& operator=(const SentencePieceTokenizer&) = delete;

  int64_t vocab_size() const;
  int32_t piece_to_id(const std::string& piece) const;  // −1 when the vocabulary has no such piece
  std::string id_to_piece(int32_t id) const;
  bool is_control(int32_t id) const;
  int32_t bos_id() const;
  int32_t eos_id() const;
  int32_t unk_id() const;
  int32_t pad_id() const;
  std::vector<int32_t> encode(std::string_view text) const;
  // All texts on `threads` threads (0: OpenMP's default); ids back to back, offsets [n + 1].
  void encode_batch(const std::vector<std::string_view>& texts, int threads, std::vector<int32_t>& ids,
                    std::vector<int64_t>& offsets) const;
  std::string decode(const std::vector<int32_t>& ids) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string path_;
};

}  // namespace kindred
