// Tokenizer: SentencePiece, linked directly. (Debian's LibTorch 1.13 loaded the system
// libprotobuf, whose symbols clashed with SentencePiece's private protobuf-lite, so SentencePiece
// had to run in a separate linker namespace; the PyTorch wheel links protobuf statically and
// shares no protobuf symbol with SentencePiece beyond three identical byteswap templates.)
#include "trainer/tokenizer.h"

#include <fmt/format.h>
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <filesystem>
#include <limits>
#include <regex>
#include <unordered_map>

#include "trainer/token_shard.h"

namespace strata {
namespace {

namespace fs = std::filesystem;

// SentencePiece's status reads "Internal: <file>(<line>) [<check>] <message>": users need
// the message (empty for some checks).
std::string status_message(const std::string& status) {
  const size_t check_end = status.rfind("] ");
  return check_end == std::string::npos ? status : status.substr(check_end + 2);
}

// The two ways a vocabulary size fails, said in terms of --vocab-size.
std::string training_error(const std::string& status, const std::string& text_file,
                           int64_t vocab_size) {
  const std::string message = status_message(status);
  std::smatch match;
  std::string reason, hint;
  if (std::regex_search(message, match, std::regex(R"(too high.*<= *(\d+))"))) {
    reason = fmt::format("the text is too small for {} pieces (it supports at most {})", vocab_size,
                         match[1].str());
    hint = fmt::format("lower --vocab-size to at most {}, or add text", match[1].str());
  } else if (std::regex_search(message, match, std::regex(R"(required_chars\. *\d+ vs (\d+))"))) {
    reason = fmt::format(
        "{} pieces cannot hold the 259 byte and special pieces plus every "
        "frequent character of the text ({} pieces needed)",
        vocab_size, match[1].str());
    hint = fmt::format("raise --vocab-size to at least {}", match[1].str());
  } else {
    reason = message;
    hint =
        "the text must be UTF-8 and not empty; a small text cannot fill a large vocabulary "
        "(lower --vocab-size)";
  }
  return fmt::format(
      "cannot train a SentencePiece tokenizer with vocabulary {} on {}: {}\n"
      "HINT: {}",
      vocab_size, text_file, reason, hint);
}

}  // namespace

Tokenizer::Tokenizer(const std::string& model_path)
    : path_(model_path), processor_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
  if (!fs::is_regular_file(model_path)) {
    throw DataError(
        fmt::format("tokenizer {} does not exist\nHINT: point data.tokenizer (or "
                    "--tokenizer) at the tokenizer.model written by strata "
                    "prepare-data",
                    model_path));
  }
  const auto status = processor_->Load(model_path);
  if (!status.ok()) {
    const std::string message = status_message(status.ToString());
    throw DataError(
        fmt::format("cannot load tokenizer {}: {}\nHINT: it must be a SentencePiece "
                    "model file (the tokenizer.model written by strata "
                    "prepare-data, or a Llama-style one)",
                    model_path, message.empty() ? "not a SentencePiece model" : message));
  }
}

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

int64_t Tokenizer::vocab_size() const { return processor_->GetPieceSize(); }
int Tokenizer::bos_id() const { return processor_->bos_id(); }
int Tokenizer::eos_id() const { return processor_->eos_id(); }

std::vector<uint32_t> Tokenizer::encode(const std::string& text) const {
  std::vector<int> ids;
  const auto status = processor_->Encode(text, &ids);
  if (!status.ok()) {
    throw DataError(fmt::format("tokenizer {} cannot encode text: {}", path_, status.ToString()));
  }
  return std::vector<uint32_t>(ids.begin(), ids.end());
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids) const {
  std::vector<int> narrow;
  const int64_t size = vocab_size();
  for (int64_t id : ids) {
    if (id >= 0 && id < size) narrow.push_back(static_cast<int>(id));
  }
  std::string text;
  const auto status = processor_->Decode(narrow, &text);
  if (!status.ok()) {
    throw DataError(fmt::format("tokenizer {} cannot decode ids: {}", path_, status.ToString()));
  }
  return text;
}

void train_tokenizer(const std::string& text_file, const std::string& model_prefix,
                     int64_t vocab_size) {
  // Llama's conventions: BPE with byte fallback (no unknown bytes), digits split, text kept
  // as is (no normalisation, whitespace preserved), <unk>=0 <s>=1 </s>=2 and no pad.
  // The map form, unlike the command-line string, logs nothing at minloglevel 2.
  const std::unordered_map<std::string, std::string> options = {
      {"input", text_file},
      {"model_prefix", model_prefix},
      {"model_type", "bpe"},
      {"vocab_size", std::to_string(vocab_size)},
      {"byte_fallback", "true"},
      {"split_digits", "true"},
      {"character_coverage", "0.9995"},
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"allow_whitespace_only_pieces", "true"},
      {"max_sentence_length", "16384"},
      {"input_sentence_size", "2000000"},
      {"shuffle_input_sentence", "true"},
      {"unk_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"pad_id", "-1"},
      {"num_threads", "2"},
      {"minloglevel", "2"},
  };
  const auto status = sentencepiece::SentencePieceTrainer::Train(options);
  if (!status.ok()) throw DataError(training_error(status.ToString(), text_file, vocab_size));
}

}  // namespace strata
