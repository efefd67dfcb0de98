// A Llama-style SentencePiece tokenizer (`tokenizer.model`, loadable by HF and llama.cpp):
// BPE with byte fallback, <unk>=0, <s>=1, </s>=2, no pad.
#pragma once

#include <cstdint>
#include <memory>
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

 private:
  std::string path_;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> processor_;
};

// Trains a tokenizer on `text_file` (one sentence per line) and writes `<model_prefix>.model`.
void train_tokenizer(const std::string& text_file, const std::string& model_prefix,
                     int64_t vocab_size);

}  // namespace strata
