// CPU tokens family: counts and labels on a hand-built batch, the budget policies, best-fit-decreasing against
// a brute-force reference (never over max_tokens, every example placed once), packed rows, the device ops'
// CPU reference against direct loops, and the argument checks.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kindred/tokens.h"

namespace kindred {
namespace {

template <typename T>
TensorView view(std::vector<T>& v, DType dt) {
  TensorView t;
  t.data = v.data();
  t.dtype = dt;
  t.shape = {static_cast<int64_t>(v.size())};
  t.strides = {1};
  return t;
}

template <typename T>
TensorView view2(std::vector<T>& v, DType dt, int64_t rows, int64_t cols) {
  TensorView t = view(v, dt);
  t.shape = {rows, cols};
  t.strides = {cols, 1};
  return t;
}

// Two examples. Example 0: [bos] [system] [user0] [asst0 header] [asst0 body*] [user1] [asst1 body*]
// Example 1: [user0] [asst0 body*] (no fixed part). * = trainable.
struct Batch {
  std::vector<int32_t> ids;
  std::vector<int64_t> seg_offsets{0};
  std::vector<uint8_t> trainable;
  std::vector<int32_t> turn, exchange;
  std::vector<int64_t> example_segs{0}, turn_offsets{0}, exchange_offsets{0};
  void seg(int len, bool tr, int t, int x) {
    for (int i = 0; i < len; ++i) ids.push_back(static_cast<int32_t>(ids.size() + 1000));
    seg_offsets.push_back(static_cast<int64_t>(ids.size()));
    trainable.push_back(tr);
    turn.push_back(t);
    exchange.push_back(x);
  }
  void end_example(int turns, int exchanges) {
    example_segs.push_back(static_cast<int64_t>(trainable.size()));
    turn_offsets.push_back(turn_offsets.back() + turns);
    exchange_offsets.push_back(exchange_offsets.back() + exchanges);
  }
  SegmentedTokens in() {
    return {view(ids, DType::i32),          view(seg_offsets, DType::i64),     view(trainable, DType::u8),
            view(turn, DType::i32),         view(exchange, DType::i32),        view(example_segs, DType::i64),
            view(turn_offsets, DType::i64), view(exchange_offsets, DType::i64)};
  }
};

Batch hand_batch() {
  Batch b;
  b.seg(1, false, -1, -1);  // bos
  b.seg(7, false, 0, -1);   // system turn
  b.seg(5, false, 1, 0);    // user 0
  b.seg(2, false, 2, 0);    // assistant 0 header
  b.seg(9, true, 2, 0);     // assistant 0 content + end of turn
  b.seg(4, false, 3, 1);    // user 1
  b.seg(6, true, 4, 1);     // assistant 1
  b.end_example(5, 2);
  b.seg(3, false, 0, 0);
  b.seg(4, true, 1, 0);
  b.end_example(2, 1);
  return b;
}

struct Counts {
  std::vector<int32_t> labels, tokens, trainable, fixed, turn_tokens, turn_trainable, x_tokens, x_trainable;
  Counts(size_t t, size_t n, size_t turns, size_t xs)
      : labels(t, 7),
        tokens(n, -1),
        trainable(n, -1),
        fixed(n, -1),
        turn_tokens(turns, -1),
        turn_trainable(turns, -1),
        x_tokens(xs, -1),
        x_trainable(xs, -1) {}
  TokenCounts out() {
    return {view(labels, DType::i32),   view(tokens, DType::i32),      view(trainable, DType::i32),
            view(fixed, DType::i32),    view(turn_tokens, DType::i32), view(turn_trainable, DType::i32),
            view(x_tokens, DType::i32), view(x_trainable, DType::i32)};
  }
};

TEST(CountTokens, HandBatch) {
  Batch b = hand_batch();
  Counts c(b.ids.size(), 2, 7, 3);
  count_tokens(b.in(), c.out());
  EXPECT_EQ(c.tokens, (std::vector<int32_t>{34, 7}));
  EXPECT_EQ(c.trainable, (std::vector<int32_t>{15, 4}));
  EXPECT_EQ(c.fixed, (std::vector<int32_t>{8, 0}));
  EXPECT_EQ(c.turn_tokens, (std::vector<int32_t>{7, 5, 11, 4, 6, 3, 4}));  // the bos belongs to no turn
  EXPECT_EQ(c.turn_trainable, (std::vector<int32_t>{0, 0, 9, 0, 6, 0, 4}));
  EXPECT_EQ(c.x_tokens, (std::vector<int32_t>{16, 10, 7}));
  EXPECT_EQ(c.x_trainable, (std::vector<int32_t>{9, 6, 4}));
  for (size_t g = 0; g < b.trainable.size(); ++g)
    for (int64_t t = b.seg_offsets[g]; t < b.seg_offsets[g + 1]; ++t)
      EXPECT_EQ(c.labels[t], b.trainable[g] ? b.ids[t] : kIgnoreIndex) << "token " << t;
}

TEST(CountTokens, RejectsBadStructure) {
  Batch b = hand_batch();
  Counts c(b.ids.size(), 2, 7, 3);
  b.turn[3] = 5;  // example 0 has 5 turns: 0..4
  try {
    count_tokens(b.in(), c.out());
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_TRUE(e.input());
    EXPECT_NE(std::string(e.what()).find("seg_turn[3] = 5"), std::string::npos) << e.what();
  }
  b = hand_batch();
  b.seg_offsets[2] = 100;
  EXPECT_THROW(count_tokens(b.in(), c.out()), Error);
  b = hand_batch();
  Counts short_out(b.ids.size() - 1, 2, 7, 3);
  EXPECT_THROW(count_tokens(b.in(), short_out.out()), Error);
}

struct Budget {
  std::vector<int32_t> tokens, fixed, x_tokens;
  std::vector<int64_t> x_offsets{0};
  std::vector<int32_t> action, drop, after;
  void add(int32_t f, std::vector<int32_t> xs) {
    fixed.push_back(f);
    tokens.push_back(f + std::accumulate(xs.begin(), xs.end(), 0));
    x_tokens.insert(x_tokens.end(), xs.begin(), xs.end());
    x_offsets.push_back(static_cast<int64_t>(x_tokens.size()));
  }
  void run(int64_t budget, BudgetPolicy p) {
    action.assign(tokens.size(), -7);
    drop.assign(tokens.size(), -7);
    after.assign(tokens.size(), -7);
    apply_budget(
        {view(tokens, DType::i32), view(fixed, DType::i32), view(x_tokens, DType::i32), view(x_offsets, DType::i64)},
        budget, p, {view(action, DType::i32), view(drop, DType::i32), view(after, DType::i32)});
  }
};

TEST(ApplyBudget, Policies) {
  Budget b;
  b.add(100, {300, 300, 300});  // 1000 tokens
  b.add(50, {200});             // 250: fits
  b.add(100, {200, 900});       // 1200; the last exchange alone is 1000
  b.add(100, {1000});           // 1100, one exchange: cannot truncate
  b.run(1000, BudgetPolicy::truncate);
  EXPECT_EQ(b.action, (std::vector<int32_t>{kKeep, kKeep, kTruncate, kDrop}));
  EXPECT_EQ(b.drop, (std::vector<int32_t>{0, 0, 1, 0}));
  EXPECT_EQ(b.after, (std::vector<int32_t>{1000, 250, 1000, 0}));
  b.run(999, BudgetPolicy::truncate);
  EXPECT_EQ(b.action, (std::vector<int32_t>{kTruncate, kKeep, kDrop, kDrop}));
  EXPECT_EQ(b.drop[0], 1);
  EXPECT_EQ(b.after[0], 700);
  b.run(1000, BudgetPolicy::drop);
  EXPECT_EQ(b.action, (std::vector<int32_t>{kKeep, kKeep, kDrop, kDrop}));
  b.run(1000, BudgetPolicy::error);
  EXPECT_EQ(b.action, (std::vector<int32_t>{kKeep, kKeep, kOver, kOver}));
  EXPECT_EQ(b.after, (std::vector<int32_t>{1000, 250, 1200, 1100}));
  EXPECT_THROW(b.run(0, BudgetPolicy::drop), Error);
}

// Best-fit-decreasing the slow way: every open row scanned for the least room that fits.
std::pair<std::vector<int32_t>, std::vector<int32_t>> brute_bfd(const std::vector<int32_t>& len, int32_t cap) {
  std::vector<int64_t> order(len.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return len[a] > len[b]; });
  std::vector<int32_t> fill, row(len.size()), start(len.size());
  for (int64_t i : order) {
    int best = -1;
    for (size_t r = 0; r < fill.size(); ++r)
      if (cap - fill[r] >= len[i] && (best < 0 || fill[r] > fill[best])) best = static_cast<int>(r);
    if (best < 0) {
      best = static_cast<int>(fill.size());
      fill.push_back(0);
    }
    row[i] = best;
    start[i] = fill[best];
    fill[best] += len[i];
  }
  return {row, start};
}

TEST(PackBfd, HandExample) {
  std::vector<int32_t> len{5, 3, 4, 2, 6, 1}, row(6, -1), start(6, -1);
  // Longest first: 6 -> row 0 (room 2); 5 -> row 1 (room 3); 4 -> row 2 (room 4); 3 -> row 1, the least room
  // that fits (room 0); 2 -> row 0 (room 0); 1 -> row 2 (room 3).
  EXPECT_EQ(pack_bfd(view(len, DType::i32), 8, view(row, DType::i32), view(start, DType::i32)), 3);
  EXPECT_EQ(row, (std::vector<int32_t>{1, 1, 2, 0, 0, 2}));
  EXPECT_EQ(start, (std::vector<int32_t>{0, 5, 0, 6, 0, 4}));
}

TEST(PackBfd, RandomAgainstBruteForceAndInvariants) {
  std::mt19937 gen(7);
  for (int trial = 0; trial < 40; ++trial) {
    const int32_t cap = std::uniform_int_distribution<int32_t>(1, 700)(gen);
    const int n = std::uniform_int_distribution<int>(0, 400)(gen);
    std::vector<int32_t> len(n), row(n), start(n);
    for (auto& l : len) l = std::uniform_int_distribution<int32_t>(1, cap)(gen);
    const int64_t rows = pack_bfd(view(len, DType::i32), cap, view(row, DType::i32), view(start, DType::i32));
    // Same room-size choices as the brute force, so the same number of rows and the same fills; the row
    // chosen among equal rooms may differ, so compare multisets of fills.
    auto [brow, bstart] = brute_bfd(len, cap);
    int32_t brows = 0;
    for (int32_t r : brow) brows = std::max(brows, r + 1);
    std::vector<int32_t> fill(rows, 0), bfill(brows, 0);
    std::vector<std::vector<std::pair<int32_t, int32_t>>> spans(rows);
    for (int i = 0; i < n; ++i) {
      ASSERT_GE(row[i], 0);
      ASSERT_LT(row[i], rows);
      spans[row[i]].push_back({start[i], start[i] + len[i]});
      fill[row[i]] += len[i];
      bfill[brow[i]] += len[i];
    }
    EXPECT_EQ(static_cast<size_t>(rows), bfill.size());
    for (auto& s : spans) {  // placements tile each row from 0, within the cap
      std::sort(s.begin(), s.end());
      int32_t end = 0;
      for (auto [a, b] : s) {
        EXPECT_EQ(a, end);
        end = b;
      }
      EXPECT_LE(end, cap);
    }
    std::sort(fill.begin(), fill.end());
    std::sort(bfill.begin(), bfill.end());
    EXPECT_EQ(fill, bfill) << "trial " << trial;
  }
}

TEST(PackBfd, RejectsLengthsOutsideTheRow) {
  std::vector<int32_t> len{3, 9}, row(2), start(2);
  try {
    pack_bfd(view(len, DType::i32), 8, view(row, DType::i32), view(start, DType::i32));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("lengths[1] = 9"), std::string::npos) << e.what();
  }
  len = {0};
  row.resize(1);
  start.resize(1);
  EXPECT_THROW(pack_bfd(view(len, DType::i32), 8, view(row, DType::i32), view(start, DType::i32)), Error);
}

TEST(PackRows, GathersRowsSequencesAndCounts) {
  // Examples of 3, 2 and 4 tokens into rows of 5: row 0 = [e2 (4)] + pad 1, row 1 = [e0 (3), e1 (2)].
  std::vector<int32_t> ids{10, 11, 12, 20, 21, 30, 31, 32, 33};
  std::vector<int32_t> labels{-100, 11, 12, -100, 21, 30, -100, 32, 33};  // e2's first label will be masked
  std::vector<int64_t> offsets{0, 3, 5, 9};
  std::vector<int32_t> row{1, 1, 0}, start{0, 3, 0};
  std::vector<int32_t> o_ids(10), o_labels(10), o_pos(10), cu(5), seq_ex(4), row_tr(2);
  std::vector<int64_t> row_seqs(3);
  pack_rows(view(ids, DType::i32), view(labels, DType::i32), view(offsets, DType::i64), view(row, DType::i32),
            view(start, DType::i32), 0,
            {view2(o_ids, DType::i32, 2, 5), view2(o_labels, DType::i32, 2, 5), view2(o_pos, DType::i32, 2, 5),
             view(cu, DType::i32), view(seq_ex, DType::i32), view(row_seqs, DType::i64), view(row_tr, DType::i32)});
  EXPECT_EQ(o_ids, (std::vector<int32_t>{30, 31, 32, 33, 0, 10, 11, 12, 20, 21}));
  EXPECT_EQ(o_labels, (std::vector<int32_t>{-100, -100, 32, 33, -100, -100, 11, 12, -100, 21}));
  EXPECT_EQ(o_pos, (std::vector<int32_t>{0, 1, 2, 3, 0, 0, 1, 2, 0, 1}));
  EXPECT_EQ(cu, (std::vector<int32_t>{0, 4, 5, 8, 10}));
  EXPECT_EQ(seq_ex, (std::vector<int32_t>{2, -1, 0, 1}));
  EXPECT_EQ(row_seqs, (std::vector<int64_t>{0, 2, 4}));
  EXPECT_EQ(row_tr, (std::vector<int32_t>{2, 3}));
  // Overlapping placements are refused.
  start = {0, 2, 0};
  EXPECT_THROW(
      pack_rows(view(ids, DType::i32), view(labels, DType::i32), view(offsets, DType::i64), view(row, DType::i32),
                view(start, DType::i32), 0,
                {view2(o_ids, DType::i32, 2, 5), view2(o_labels, DType::i32, 2, 5), view2(o_pos, DType::i32, 2, 5),
                 view(cu, DType::i32), view(seq_ex, DType::i32), view(row_seqs, DType::i64), view(row_tr, DType::i32)}),
      Error);
}

TEST(DeviceOpsCpu, CountTrainableAndPositionIds) {
  std::mt19937 gen(3);
  const int64_t rows = 3, l = 37;
  std::vector<int64_t> labels(rows * l);
  for (auto& x : labels) x = std::bernoulli_distribution(0.6)(gen) ? 5 : kIgnoreIndex;
  std::vector<int32_t> cu{0};
  for (int64_t r = 0; r < rows; ++r) {  // random sequences inside each row, one empty
    int64_t at = r * l;
    while (at < (r + 1) * l) {
      at = std::min<int64_t>((r + 1) * l, at + std::uniform_int_distribution<int>(1, 12)(gen));
      cu.push_back(static_cast<int32_t>(at));
    }
  }
  cu.insert(cu.begin() + 2, cu[1]);
  const int64_t q = static_cast<int64_t>(cu.size()) - 1;
  std::vector<int32_t> seq(q, -1), row(rows, -1), total(1, -1);
  count_trainable(view2(labels, DType::i64, rows, l), view(cu, DType::i32), view(seq, DType::i32),
                  view(row, DType::i32), view(total, DType::i32), 0);
  int32_t all = 0;
  std::vector<int32_t> want_row(rows, 0);
  for (int64_t s = 0; s < q; ++s) {
    int32_t c = 0;
    for (int64_t t = cu[s]; t < cu[s + 1]; ++t) c += labels[t] != kIgnoreIndex;
    EXPECT_EQ(seq[s], c) << "sequence " << s;
    all += c;
  }
  for (int64_t t = 0; t < rows * l; ++t) want_row[t / l] += labels[t] != kIgnoreIndex;
  EXPECT_EQ(row, want_row);
  EXPECT_EQ(total[0], all);

  std::vector<int64_t> pos(rows * l, -1);
  position_ids(view(cu, DType::i32), view(pos, DType::i64), 0);
  for (int64_t s = 0; s < q; ++s)
    for (int64_t t = cu[s]; t < cu[s + 1]; ++t) EXPECT_EQ(pos[t], t - cu[s]);

  std::vector<int32_t> crossing{0, 30, 50, rows * l};  // 30..50 crosses the row boundary at 37
  std::vector<int32_t> seq3(3);
  EXPECT_THROW(count_trainable(view2(labels, DType::i64, rows, l), view(crossing, DType::i32), view(seq3, DType::i32),
                               view(row, DType::i32), view(total, DType::i32), 0),
               Error);
  std::vector<int32_t> short_cu{0, 10};
  EXPECT_THROW(position_ids(view(short_cu, DType::i32), view(pos, DType::i64), 0), Error);
}

TEST(SentencePiece, MissingFileNamesThePath) {
  if (!sentencepiece_compiled()) GTEST_SKIP() << "built without the sentencepiece C++ library";
  try {
    SentencePieceTokenizer sp("/nonexistent/tokenizer.model");
    FAIL();
  } catch (const Error& e) {
    EXPECT_TRUE(e.input());
    EXPECT_NE(std::string(e.what()).find("/nonexistent/tokenizer.model"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace kindred
