// Bindings of the tokens family (kindred/tokens.h): accounting, budget, packing, the device count / position
// ops, and the sentencepiece tokenizer (when compiled in; `sentencepiece_compiled()` says).
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <string_view>
#include <utility>
#include <vector>

#include "bind.h"
#include "kindred/tokens.h"

namespace py = pybind11;

namespace kindred {
namespace {

// A 1-D numpy array that takes over `v` without copying.
template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& v) {
  auto* heap = new std::vector<T>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>({static_cast<py::ssize_t>(heap->size())}, {static_cast<py::ssize_t>(sizeof(T))}, heap->data(),
                        owner);
}

// The budget policies by name (Python's BUDGET_POLICIES).
constexpr std::pair<const char*, BudgetPolicy> kPolicies[] = {
    {"error", BudgetPolicy::error}, {"drop", BudgetPolicy::drop}, {"truncate", BudgetPolicy::truncate}};

BudgetPolicy parse_policy(const std::string& name) {
  for (auto [n, policy] : kPolicies)
    if (name == n) return policy;
  throw Error(cat("policy must be 'error', 'drop' or 'truncate', got '", name, "'"), true);
}

// UTF-8 views of a list of str; the list keeps the strings (and their cached UTF-8) alive.
std::vector<std::string_view> utf8_views(const py::sequence& texts) {
  std::vector<std::string_view> views;
  views.reserve(py::len(texts));
  for (py::handle h : texts) {
    if (!PyUnicode_Check(h.ptr()))
      throw Error(cat("texts must be str, got ", py::str(h.get_type()).cast<std::string>()), true);
    Py_ssize_t size = 0;
    const char* data = PyUnicode_AsUTF8AndSize(h.ptr(), &size);
    if (data == nullptr) throw py::error_already_set();
    views.emplace_back(data, static_cast<size_t>(size));
  }
  return views;
}

}  // namespace

void bind_tokens(py::module_& m) {
  m.attr("IGNORE_INDEX") = kIgnoreIndex;
  py::list policies;
  for (auto [n, policy] : kPolicies) policies.append(n);
  m.attr("BUDGET_POLICIES") = py::tuple(policies);
  m.attr("BUDGET_KEEP") = static_cast<int>(kKeep);
  m.attr("BUDGET_TRUNCATE") = static_cast<int>(kTruncate);
  m.attr("BUDGET_DROP") = static_cast<int>(kDrop);
  m.attr("BUDGET_OVER") = static_cast<int>(kOver);
  m.def("sentencepiece_compiled", &sentencepiece_compiled,
        "whether the sentencepiece C++ library was found at build time (SentencePieceTokenizer available)");

  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def(
      "count_tokens",
      [](const TensorView& ids, const TensorView& seg_offsets, const TensorView& seg_trainable,
         const TensorView& seg_turn, const TensorView& seg_exchange, const TensorView& example_segs,
         const TensorView& turn_offsets, const TensorView& exchange_offsets, const TensorView& labels,
         const TensorView& example_tokens, const TensorView& example_trainable, const TensorView& example_fixed,
         const TensorView& turn_tokens, const TensorView& turn_trainable, const TensorView& exchange_tokens,
         const TensorView& exchange_trainable) {
        count_tokens(SegmentedTokens{ids, seg_offsets, seg_trainable, seg_turn, seg_exchange, example_segs,
                                     turn_offsets, exchange_offsets},
                     TokenCounts{labels, example_tokens, example_trainable, example_fixed, turn_tokens, turn_trainable,
                                 exchange_tokens, exchange_trainable});
      },
      py::arg("ids"), py::arg("seg_offsets"), py::arg("seg_trainable"), py::arg("seg_turn"), py::arg("seg_exchange"),
      py::arg("example_segs"), py::arg("turn_offsets"), py::arg("exchange_offsets"), py::arg("labels"),
      py::arg("example_tokens"), py::arg("example_trainable"), py::arg("example_fixed"), py::arg("turn_tokens"),
      py::arg("turn_trainable"), py::arg("exchange_tokens"), py::arg("exchange_trainable"), release);
  m.def(
      "apply_budget",
      [](const TensorView& example_tokens, const TensorView& example_fixed, const TensorView& exchange_tokens,
         const TensorView& exchange_offsets, int64_t budget, const std::string& policy, const TensorView& action,
         const TensorView& drop_exchanges, const TensorView& tokens_after) {
        apply_budget(BudgetInput{example_tokens, example_fixed, exchange_tokens, exchange_offsets}, budget,
                     parse_policy(policy), BudgetOutput{action, drop_exchanges, tokens_after});
      },
      py::arg("example_tokens"), py::arg("example_fixed"), py::arg("exchange_tokens"), py::arg("exchange_offsets"),
      py::arg("budget"), py::arg("policy"), py::arg("action"), py::arg("drop_exchanges"), py::arg("tokens_after"),
      release);
  m.def("pack_bfd", &pack_bfd, py::arg("lengths"), py::arg("max_tokens"), py::arg("row"), py::arg("start"), release);
  m.def(
      "pack_rows",
      [](const TensorView& ids, const TensorView& labels, const TensorView& example_offsets, const TensorView& row,
         const TensorView& start, int32_t pad_id, const TensorView& input_ids, const TensorView& labels_out,
         const TensorView& position_ids, const TensorView& cu_seqlens, const TensorView& seq_example,
         const TensorView& row_seqs, const TensorView& row_trainable) {
        pack_rows(ids, labels, example_offsets, row, start, pad_id,
                  PackedRows{input_ids, labels_out, position_ids, cu_seqlens, seq_example, row_seqs, row_trainable});
      },
      py::arg("ids"), py::arg("labels"), py::arg("example_offsets"), py::arg("row"), py::arg("start"),
      py::arg("pad_id"), py::arg("input_ids"), py::arg("labels_out"), py::arg("position_ids"), py::arg("cu_seqlens"),
      py::arg("seq_example"), py::arg("row_seqs"), py::arg("row_trainable"), release);
  m.def("count_trainable", &count_trainable, py::arg("labels"), py::arg("cu_seqlens"), py::arg("seq_trainable"),
        py::arg("row_trainable"), py::arg("total"), py::arg("stream"), release);
  m.def("position_ids", &position_ids, py::arg("cu_seqlens"), py::arg("out"), py::arg("stream"), release);

  py::class_<SentencePieceTokenizer>(m, "SentencePieceTokenizer",
                                     "a sentencepiece .model through the C++ library (batch encode on all cores)")
      .def(py::init<const std::string&>(), py::arg("path"), release)
      .def_property_readonly("vocab_size", &SentencePieceTokenizer::vocab_size)
      .def_property_readonly("bos_id", &SentencePieceTokenizer::bos_id)
      .def_property_readonly("eos_id", &SentencePieceTokenizer::eos_id)
      .def_property_readonly("unk_id", &SentencePieceTokenizer::unk_id)
      .def_property_readonly("pad_id", &SentencePieceTokenizer::pad_id)
      .def("piece_to_id", &SentencePieceTokenizer::piece_to_id, py::arg("piece"))
      .def("id_to_piece", &SentencePieceTokenizer::id_to_piece, py::arg("id"))
      .def("is_control", &SentencePieceTokenizer::is_control, py::arg("id"))
      .def(
          "encode",
          [](const SentencePieceTokenizer& sp, const std::string& text) {
            std::vector<int32_t> ids;
            {
              py::gil_scoped_release nogil;
              ids = sp.encode(text);
            }
            return to_numpy(std::move(ids));
          },
          py::arg("text"))
      .def(
          "encode_batch",
          [](const SentencePieceTokenizer& sp, const py::sequence& texts, int threads) {
            const std::vector<std::string_view> views = utf8_views(texts);
            std::vector<int32_t> ids;
            std::vector<int64_t> offsets;
            {
              py::gil_scoped_release nogil;
              sp.encode_batch(views, threads, ids, offsets);
            }
            return py::make_tuple(to_numpy(std::move(ids)), to_numpy(std::move(offsets)));
          },
          py::arg("texts"), py::arg("threads") = 0,
          "(ids int32 [total], offsets int64 [n + 1]) of all texts, encoded on `threads` threads (0: all)")
      .def("decode", &SentencePieceTokenizer::decode, py::arg("ids"), release);
}

}  // namespace kindred
