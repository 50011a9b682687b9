// SentencePiece `.model` tokenizer through the sentencepiece C++ library: batch encoding on all cores with
// OpenMP. Compiled in when CMake found the library (KINDRED_WITH_SENTENCEPIECE); otherwise every entry point
// says so, and Python falls back to the `sentencepiece` package.
#include <cstdio>

#include "kindred/tokens.h"

#ifdef KINDRED_WITH_SENTENCEPIECE
#include <sentencepiece_processor.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace kindred {

bool sentencepiece_compiled() {
#ifdef KINDRED_WITH_SENTENCEPIECE
  return true;
#else
  return false;
#endif
}

#ifdef KINDRED_WITH_SENTENCEPIECE

struct SentencePieceTokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
};

SentencePieceTokenizer::SentencePieceTokenizer(const std::string& path) : impl_(std::make_unique<Impl>()), path_(path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  KINDRED_CHECK(f != nullptr, path, ": tokenizer file not found");
  std::fclose(f);
  const auto status = impl_->sp.Load(path);
  KINDRED_CHECK(status.ok(), path, ": not a valid sentencepiece model (", status.ToString(), ")");
}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

int64_t SentencePieceTokenizer::vocab_size() const {
  return impl_->sp.GetPieceSize();
}

int32_t SentencePieceTokenizer::piece_to_id(const std::string& piece) const {
  const int id = impl_->sp.PieceToId(piece);
  // PieceToId answers unk_id for unknown pieces: only a round trip tells.
  return id >= 0 && impl_->sp.IdToPiece(id) == piece ? id : -1;
}

std::string SentencePieceTokenizer::id_to_piece(int32_t id) const {
  KINDRED_CHECK(id >= 0 && id < vocab_size(), "token id ", id, " is outside the vocabulary of ", vocab_size(), " (",
                path_, ")");
  return impl_->sp.IdToPiece(id);
}

bool SentencePieceTokenizer::is_control(int32_t id) const {
  return id >= 0 && id < vocab_size() && impl_->sp.IsControl(id);
}

int32_t SentencePieceTokenizer::bos_id() const {
  return impl_->sp.bos_id();
}
int32_t SentencePieceTokenizer::eos_id() const {
  return impl_->sp.eos_id();
}
int32_t SentencePieceTokenizer::unk_id() const {
  return impl_->sp.unk_id();
}
int32_t SentencePieceTokenizer::pad_id() const {
  return impl_->sp.pad_id();
}

std::vector<int32_t> SentencePieceTokenizer::encode(std::string_view text) const {
  std::vector<int> ids;
  const auto status = impl_->sp.Encode(text, &ids);
  KINDRED_CHECK(status.ok(), path_, ": sentencepiece could not encode the text (", status.ToString(), ")");
  return {ids.begin(), ids.end()};
}

void SentencePieceTokenizer::encode_batch(const std::vector<std::string_view>& texts, int threads,
                                          std::vector<int32_t>& ids, std::vector<int64_t>& offsets) const {
  const int64_t n = static_cast<int64_t>(texts.size());
  std::vector<std::vector<int>> pieces(n);
  std::string first_error;
  (void)threads;
#ifdef _OPENMP
  const int nt = threads > 0 ? threads : omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 64) num_threads(nt)
#endif
  for (int64_t i = 0; i < n; ++i) {
    const auto status = impl_->sp.Encode(texts[i], &pieces[i]);
    if (!status.ok()) {
#pragma omp critical(kindred_sp_error)
      if (first_error.empty()) first_error = cat("text ", i, ": ", status.ToString());
    }
  }
  KINDRED_CHECK(first_error.empty(), path_, ": sentencepiece could not encode ", first_error);
  offsets.assign(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) offsets[i + 1] = offsets[i] + static_cast<int64_t>(pieces[i].size());
  ids.resize(offsets[n]);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) std::copy(pieces[i].begin(), pieces[i].end(), ids.begin() + offsets[i]);
}

std::string SentencePieceTokenizer::decode(const std::vector<int32_t>& ids) const {
  for (int32_t id : ids)
    KINDRED_CHECK(id >= 0 && id < vocab_size(), "token id ", id, " is outside the vocabulary of ", vocab_size(), " (",
                  path_, ")");
  std::string text;
  const auto status = impl_->sp.Decode(std::vector<int>(ids.begin(), ids.end()), &text);
  KINDRED_CHECK(status.ok(), path_, ": sentencepiece could not decode (", status.ToString(), ")");
  return text;
}

#else  // no sentencepiece library at build time

struct SentencePieceTokenizer::Impl {};

namespace {
[[noreturn]] void no_sentencepiece() {
  throw Error(
      "kindred was built without the sentencepiece C++ library (install libsentencepiece-dev and "
      "rebuild); use the sentencepiece Python package instead",
      true);
}
}  // namespace

SentencePieceTokenizer::SentencePieceTokenizer(const std::string& path) : path_(path) {
  no_sentencepiece();
}
SentencePieceTokenizer::~SentencePieceTokenizer() = default;
int64_t SentencePieceTokenizer::vocab_size() const {
  no_sentencepiece();
}
int32_t SentencePieceTokenizer::piece_to_id(const std::string&) const {
  no_sentencepiece();
}
std::string SentencePieceTokenizer::id_to_piece(int32_t) const {
  no_sentencepiece();
}
bool SentencePieceTokenizer::is_control(int32_t) const {
  no_sentencepiece();
}
int32_t SentencePieceTokenizer::bos_id() const {
  no_sentencepiece();
}
int32_t SentencePieceTokenizer::eos_id() const {
  no_sentencepiece();
}
int32_t SentencePieceTokenizer::unk_id() const {
  no_sentencepiece();
}
int32_t SentencePieceTokenizer::pad_id() const {
  no_sentencepiece();
}
std::vector<int32_t> SentencePieceTokenizer::encode(std::string_view) const {
  no_sentencepiece();
}
void SentencePieceTokenizer::encode_batch(const std::vector<std::string_view>&, int, std::vector<int32_t>&,
                                          std::vector<int64_t>&) const {
  no_sentencepiece();
}
std::string SentencePieceTokenizer::decode(const std::vector<int32_t>&) const {
  no_sentencepiece();
}

#endif

}  // namespace kindred
