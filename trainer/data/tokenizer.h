// A Llama-style SentencePiece tokenizer (`tokenizer.model`, loadable by HF and llama.cpp):
// BPE with byte fallback, <unk>=0, <s>=1, </s>=2, no pad.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace strata {

class Tokenizer {
 public:
  explicit Tokenizer(const std::string& model_path);  // throws DataError
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  int64_t vocab_size() const;
  int bos_id() const;
  int eos_id() const;
  std::vector<uint32_t> encode(const std::string& text) const;  // no BOS/EOS added
  std::string decode(const std::vector<int64_t>& ids) const;

  // The same tokenizer as a Hugging Face `tokenizer.json` (a `tokenizers` BPE model with byte
  // fallback, the vocabulary in id order, the merges transformers derives from it, the dummy
  // prefix as a normalizer, BOS added by the post-processor, SentencePiece's decoding), which
  // encodes every text to the ids `encode` gives (BOS first) without SentencePiece or protobuf.
  // nullopt for a model this form cannot reproduce: not BPE, or with a normalisation other than
  // "identity" (extra whitespace removed, no dummy prefix).
  std::optional<std::string> hf_tokenizer_json() const;

 private:
  std::string path_;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> processor_;
};

// Trains a tokenizer on `text_file` (one sentence per line) and writes `<model_prefix>.model`.
void train_tokenizer(const std::string& text_file, const std::string& model_prefix,
                     int64_t vocab_size);

}  // namespace strata
