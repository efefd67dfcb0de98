// SentencePiece tokenizer: loading, encoding, decoding, and training a Llama-style model.
#include "trainer/tokenizer.h"

#include <fmt/format.h>
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <filesystem>
#include <unordered_map>

#include "trainer/token_shard.h"

namespace strata {

Tokenizer::Tokenizer(const std::string& model_path)
    : path_(model_path), processor_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
  if (!std::filesystem::is_regular_file(model_path)) {
    throw DataError(fmt::format("tokenizer {} does not exist\nHINT: point data.tokenizer (or "
                                "--tokenizer) at the tokenizer.model written by strata "
                                "prepare-data",
                                model_path));
  }
  const auto status = processor_->Load(model_path);
  if (!status.ok()) {
    throw DataError(fmt::format("cannot load tokenizer {}: {}\nHINT: it must be a SentencePiece "
                                "model file (tokenizer.model)",
                                model_path, status.ToString()));
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
  for (int64_t id : ids) {
    if (id >= 0 && id < vocab_size()) narrow.push_back(static_cast<int>(id));
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
  const std::unordered_map<std::string, std::string> spec = {
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
  const auto status = sentencepiece::SentencePieceTrainer::Train(spec);
  if (!status.ok()) {
    throw DataError(fmt::format(
        "training a SentencePiece tokenizer with vocabulary {} on {} failed: {}\nHINT: a small "
        "corpus cannot fill a large vocabulary: lower --vocab-size, or add text",
        vocab_size, text_file, status.ToString()));
  }
}

}  // namespace strata
