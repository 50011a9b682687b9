// CPU reference of the tokens family: per-example / per-turn / per-exchange counts and assistant-only labels,
// the budget policy, best-fit-decreasing packing, packed-row gathering, and the CPU versions of the two
// device ops. Arguments were validated in csrc/tokens.cpp; these functions check only what they discover
// on their way (row placement, cu_seqlens values).
#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "kindred/tokens.h"

namespace kindred {

void count_tokens_cpu(const SegmentedTokens& in, const TokenCounts& out) {
  const int64_t n = in.example_segs.numel() - 1;
  const int32_t* ids = in.ids.ptr<int32_t>();
  const int64_t* so = in.seg_offsets.ptr<int64_t>();
  const uint8_t* trainable = in.seg_trainable.ptr<uint8_t>();
  const int32_t* turn = in.seg_turn.ptr<int32_t>();
  const int32_t* exch = in.seg_exchange.ptr<int32_t>();
  const int64_t* es = in.example_segs.ptr<int64_t>();
  const int64_t* to = in.turn_offsets.ptr<int64_t>();
  const int64_t* xo = in.exchange_offsets.ptr<int64_t>();
  int32_t* labels = out.labels.ptr<int32_t>();
  int32_t* ex_tokens = out.example_tokens.ptr<int32_t>();
  int32_t* ex_trainable = out.example_trainable.ptr<int32_t>();
  int32_t* ex_fixed = out.example_fixed.ptr<int32_t>();
  int32_t* turn_tokens = out.turn_tokens.ptr<int32_t>();
  int32_t* turn_trainable = out.turn_trainable.ptr<int32_t>();
  int32_t* xc_tokens = out.exchange_tokens.ptr<int32_t>();
  int32_t* xc_trainable = out.exchange_trainable.ptr<int32_t>();
#pragma omp parallel for schedule(dynamic, 256)
  for (int64_t e = 0; e < n; ++e) {
    for (int64_t k = to[e]; k < to[e + 1]; ++k) turn_tokens[k] = turn_trainable[k] = 0;
    for (int64_t k = xo[e]; k < xo[e + 1]; ++k) xc_tokens[k] = xc_trainable[k] = 0;
    int64_t total = 0, trained = 0, fixed = 0;
    for (int64_t g = es[e]; g < es[e + 1]; ++g) {
      const int64_t a = so[g], b = so[g + 1];
      const int32_t len = static_cast<int32_t>(b - a);
      const bool tr = trainable[g] != 0;
      if (tr) {
        std::memcpy(labels + a, ids + a, sizeof(int32_t) * (b - a));
      } else {
        std::fill(labels + a, labels + b, kIgnoreIndex);
      }
      const int32_t len_tr = tr ? len : 0;
      total += len;
      trained += len_tr;
      if (turn[g] >= 0) {
        turn_tokens[to[e] + turn[g]] += len;
        turn_trainable[to[e] + turn[g]] += len_tr;
      }
      if (exch[g] >= 0) {
        xc_tokens[xo[e] + exch[g]] += len;
        xc_trainable[xo[e] + exch[g]] += len_tr;
      } else {
        fixed += len;
      }
    }
    ex_tokens[e] = static_cast<int32_t>(total);
    ex_trainable[e] = static_cast<int32_t>(trained);
    ex_fixed[e] = static_cast<int32_t>(fixed);
  }
}

void apply_budget_cpu(const BudgetInput& in, int64_t budget, BudgetPolicy policy, const BudgetOutput& out) {
  const int64_t n = in.example_tokens.numel();
  const int32_t* tokens = in.example_tokens.ptr<int32_t>();
  const int32_t* xt = in.exchange_tokens.ptr<int32_t>();
  const int64_t* xo = in.exchange_offsets.ptr<int64_t>();
  int32_t* action = out.action.ptr<int32_t>();
  int32_t* drop = out.drop_exchanges.ptr<int32_t>();
  int32_t* after = out.tokens_after.ptr<int32_t>();
  for (int64_t e = 0; e < n; ++e) {
    drop[e] = 0;
    after[e] = tokens[e];
    action[e] = kKeep;
    if (tokens[e] <= budget) continue;
    if (policy == BudgetPolicy::error) {
      action[e] = kOver;
      continue;
    }
    if (policy == BudgetPolicy::truncate) {
      // Drop whole exchanges from the front; the fixed tokens and the last exchange always stay.
      int64_t remaining = tokens[e], k = 0;
      const int64_t exchanges = xo[e + 1] - xo[e];
      while (k < exchanges - 1 && remaining > budget) remaining -= xt[xo[e] + k++];
      if (remaining <= budget) {
        action[e] = kTruncate;
        drop[e] = static_cast<int32_t>(k);
        after[e] = static_cast<int32_t>(remaining);
        continue;
      }
    }
    action[e] = kDrop;
    after[e] = 0;
  }
}

namespace {

// A set of integers in [0, c] answering "smallest member ≥ x" in O(log64 c): a bitset with summary levels
// (bit i of level l+1 says whether word i of level l has any bit set).
class CapacitySet {
 public:
  explicit CapacitySet(int64_t c) {
    int64_t bits = c + 1;
    do {
      levels_.emplace_back((bits + 63) / 64, 0);
      bits = (bits + 63) / 64;
    } while (bits > 1);
  }
  void insert(int64_t i) {
    for (auto& level : levels_) {
      level[i >> 6] |= uint64_t{1} << (i & 63);
      i >>= 6;
    }
  }
  void erase(int64_t i) {
    for (auto& level : levels_) {
      level[i >> 6] &= ~(uint64_t{1} << (i & 63));
      if (level[i >> 6]) break;
      i >>= 6;
    }
  }
  int64_t next(int64_t x) const {  // smallest member ≥ x, −1 if none
    size_t l = 0;
    int64_t i = x;
    while (true) {
      if (l == levels_.size()) return -1;
      const auto& level = levels_[l];
      const int64_t w = i >> 6;
      if (w >= static_cast<int64_t>(level.size())) return -1;
      const uint64_t bits = level[w] & (~uint64_t{0} << (i & 63));
      if (bits) {
        i = (w << 6) + __builtin_ctzll(bits);
        break;
      }
      i = w + 1;
      ++l;
    }
    while (l > 0) {
      --l;
      i = (i << 6) + __builtin_ctzll(levels_[l][i]);
    }
    return i;
  }

 private:
  std::vector<std::vector<uint64_t>> levels_;
};

}  // namespace

int64_t pack_bfd_cpu(const TensorView& lengths, int64_t max_tokens, const TensorView& row, const TensorView& start) {
  const int64_t n = lengths.numel();
  const int32_t* len = lengths.ptr<int32_t>();
  int32_t* out_row = row.ptr<int32_t>();
  int32_t* out_start = start.ptr<int32_t>();
  const int64_t c = max_tokens;
  // Counting sort, longest first, ties in index order.
  std::vector<int64_t> first(c + 2, 0);
  for (int64_t i = 0; i < n; ++i) ++first[c - len[i]];
  int64_t acc = 0;
  for (int64_t v = 0; v <= c; ++v) {
    const int64_t k = first[v];
    first[v] = acc;
    acc += k;
  }
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[first[c - len[i]]++] = i;
  // Open rows bucketed by remaining room: head[room] -> row, next_in_bucket[row] -> row.
  std::vector<int32_t> head(c + 1, -1);
  std::vector<int32_t> next_in_bucket;
  next_in_bucket.reserve(n / 4 + 16);
  CapacitySet rooms(c);
  int64_t rows = 0;
  for (int64_t i : order) {
    const int64_t l = len[i];
    const int64_t room = rooms.next(l);
    int32_t r;
    int64_t fill;
    if (room < 0) {
      KINDRED_CHECK(rows < std::numeric_limits<int32_t>::max(), "more than 2^31 rows");
      r = static_cast<int32_t>(rows++);
      next_in_bucket.push_back(-1);
      fill = 0;
    } else {
      r = head[room];
      head[room] = next_in_bucket[r];
      if (head[room] < 0) rooms.erase(room);
      fill = c - room;
    }
    out_row[i] = r;
    out_start[i] = static_cast<int32_t>(fill);
    const int64_t left = c - fill - l;
    if (left > 0) {
      next_in_bucket[r] = head[left];
      if (head[left] < 0) rooms.insert(left);
      head[left] = r;
    }
  }
  return rows;
}

void pack_rows_cpu(const TensorView& ids, const TensorView& labels, const TensorView& example_offsets,
                   const TensorView& row, const TensorView& start, int32_t pad_id, const PackedRows& out) {
  const int64_t n = example_offsets.numel() - 1;
  const int64_t rows = out.input_ids.shape[0], l = out.input_ids.shape[1];
  const int32_t* in_ids = ids.ptr<int32_t>();
  const int32_t* in_labels = labels.ptr<int32_t>();
  const int64_t* eo = example_offsets.ptr<int64_t>();
  const int32_t* ex_row = row.ptr<int32_t>();
  const int32_t* ex_start = start.ptr<int32_t>();
  for (int64_t e = 0; e < n; ++e) {
    const int64_t len = eo[e + 1] - eo[e];
    KINDRED_CHECK(ex_row[e] >= 0 && ex_row[e] < rows, "row[", e, "] = ", ex_row[e], " is outside the ", rows, " rows");
    KINDRED_CHECK(len >= 1, "example ", e, " is empty; every packed example needs at least one token");
    KINDRED_CHECK(ex_start[e] >= 0 && ex_start[e] + len <= l, "example ", e, " (", len, " tokens at start ",
                  ex_start[e], ") does not fit a row of ", l, " tokens");
  }
  // Examples of each row, by start.
  std::vector<int64_t> row_first(rows + 1, 0);
  for (int64_t e = 0; e < n; ++e) ++row_first[ex_row[e] + 1];
  for (int64_t r = 0; r < rows; ++r) row_first[r + 1] += row_first[r];
  std::vector<int64_t> by_row(n);
  {
    std::vector<int64_t> cursor(row_first.begin(), row_first.end() - 1);
    for (int64_t e = 0; e < n; ++e) by_row[cursor[ex_row[e]]++] = e;
  }
  int64_t* row_seqs = out.row_seqs.ptr<int64_t>();
  std::vector<int64_t> fill(rows);
  row_seqs[0] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    auto* b = by_row.data() + row_first[r];
    auto* e = by_row.data() + row_first[r + 1];
    std::sort(b, e, [&](int64_t x, int64_t y) { return ex_start[x] < ex_start[y]; });
    int64_t end = 0;
    for (auto* p = b; p != e; ++p) {
      KINDRED_CHECK(ex_start[*p] == end, "row ", r, ": example ", *p, " starts at ", ex_start[*p],
                    " but the row is filled up to ", end, " (placements must tile each row from 0, without gaps or ",
                    "overlaps)");
      end += eo[*p + 1] - eo[*p];
    }
    fill[r] = end;
    row_seqs[r + 1] = row_seqs[r] + (e - b) + (end < l ? 1 : 0);
  }
  const int64_t q = row_seqs[rows];
  KINDRED_CHECK(out.cu_seqlens.numel() == q + 1, "cu_seqlens must have ", q + 1, " elements (", n, " examples + ",
                q - n, " padded rows + 1), got ", out.cu_seqlens.describe());
  int32_t* o_ids = out.input_ids.ptr<int32_t>();
  int32_t* o_labels = out.labels.ptr<int32_t>();
  int32_t* o_pos = out.position_ids.ptr<int32_t>();
  int32_t* cu = out.cu_seqlens.ptr<int32_t>();
  int32_t* seq_example = out.seq_example.ptr<int32_t>();
  int32_t* row_trainable = out.row_trainable.ptr<int32_t>();
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t r = 0; r < rows; ++r) {
    int32_t* ri = o_ids + r * l;
    int32_t* rl = o_labels + r * l;
    int32_t* rp = o_pos + r * l;
    int64_t s = row_seqs[r];
    int32_t trained = 0;
    for (int64_t k = row_first[r]; k < row_first[r + 1]; ++k, ++s) {
      const int64_t e = by_row[k], a = eo[e], len = eo[e + 1] - a, at = ex_start[e];
      std::memcpy(ri + at, in_ids + a, sizeof(int32_t) * len);
      std::memcpy(rl + at, in_labels + a, sizeof(int32_t) * len);
      rl[at] = kIgnoreIndex;  // no target across a sequence start
      for (int64_t j = 0; j < len; ++j) {
        rp[at + j] = static_cast<int32_t>(j);
        trained += rl[at + j] != kIgnoreIndex;
      }
      cu[s] = static_cast<int32_t>(r * l + at);
      seq_example[s] = static_cast<int32_t>(e);
    }
    if (fill[r] < l) {
      std::fill(ri + fill[r], ri + l, pad_id);
      std::fill(rl + fill[r], rl + l, kIgnoreIndex);
      for (int64_t j = fill[r]; j < l; ++j) rp[j] = static_cast<int32_t>(j - fill[r]);
      cu[s] = static_cast<int32_t>(r * l + fill[r]);
      seq_example[s] = -1;
    }
    row_trainable[r] = trained;
  }
  cu[q] = static_cast<int32_t>(rows * l);
}

namespace {

// cu_seqlens values on the CPU: 0, non-decreasing, ending at `tokens`; with `row_length` > 0, no sequence
// crosses a row boundary.
void check_cu_values(const TensorView& cu_seqlens, int64_t tokens, int64_t row_length) {
  const int32_t* cu = cu_seqlens.ptr<int32_t>();
  const int64_t q = cu_seqlens.numel() - 1;
  KINDRED_CHECK(cu[0] == 0, "cu_seqlens[0] must be 0, got ", cu[0]);
  for (int64_t i = 0; i < q; ++i) {
    KINDRED_CHECK(cu[i + 1] >= cu[i], "cu_seqlens must be non-decreasing, got cu_seqlens[", i, "] = ", cu[i],
                  " > cu_seqlens[", i + 1, "] = ", cu[i + 1]);
    if (row_length > 0 && cu[i + 1] > cu[i])
      KINDRED_CHECK(cu[i] / row_length == (cu[i + 1] - 1) / row_length, "sequence ", i, " (tokens ", cu[i], "..",
                    cu[i + 1], ") crosses a row boundary (rows of ", row_length, " tokens)");
  }
  KINDRED_CHECK(cu[q] == tokens, "cu_seqlens[", q, "] must equal the number of tokens ", tokens, ", got ", cu[q]);
}

template <typename T>
void count_trainable_impl(const T* labels, const int32_t* cu, int64_t q, int64_t row_length, int32_t* seq, int32_t* row,
                          int32_t* total) {
  int64_t all = 0;
  for (int64_t s = 0; s < q; ++s) {
    int32_t c = 0;
    for (int64_t t = cu[s]; t < cu[s + 1]; ++t) c += labels[t] != kIgnoreIndex;
    seq[s] = c;
    if (cu[s + 1] > cu[s]) row[cu[s] / row_length] += c;
    all += c;
  }
  total[0] = static_cast<int32_t>(all);
}

template <typename T>
void position_ids_impl(const int32_t* cu, int64_t q, T* out) {
  for (int64_t s = 0; s < q; ++s)
    for (int64_t t = cu[s]; t < cu[s + 1]; ++t) out[t] = static_cast<T>(t - cu[s]);
}

}  // namespace

void count_trainable_cpu(const TensorView& labels, const TensorView& cu_seqlens, const TensorView& seq_trainable,
                         const TensorView& row_trainable, const TensorView& total) {
  const int64_t tokens = labels.numel();
  const int64_t row_length = labels.dim() == 2 ? labels.shape[1] : std::max<int64_t>(tokens, 1);
  check_cu_values(cu_seqlens, tokens, row_length);
  const int64_t q = cu_seqlens.numel() - 1;
  int32_t* row = row_trainable.ptr<int32_t>();
  std::fill(row, row + row_trainable.numel(), 0);
  if (labels.dtype == DType::i32)
    count_trainable_impl(labels.ptr<int32_t>(), cu_seqlens.ptr<int32_t>(), q, row_length, seq_trainable.ptr<int32_t>(),
                         row, total.ptr<int32_t>());
  else
    count_trainable_impl(labels.ptr<int64_t>(), cu_seqlens.ptr<int32_t>(), q, row_length, seq_trainable.ptr<int32_t>(),
                         row, total.ptr<int32_t>());
}

void position_ids_cpu(const TensorView& cu_seqlens, const TensorView& out) {
  check_cu_values(cu_seqlens, out.numel(), 0);
  const int64_t q = cu_seqlens.numel() - 1;
  if (out.dtype == DType::i32)
    position_ids_impl(cu_seqlens.ptr<int32_t>(), q, out.ptr<int32_t>());
  else
    position_ids_impl(cu_seqlens.ptr<int32_t>(), q, out.ptr<int64_t>());
}

}  // namespace kindred
