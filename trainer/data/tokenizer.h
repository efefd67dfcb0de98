// The tokenizer: a Llama-style SentencePiece model (`tokenizer.model`, loadable by HF and
// llama.cpp: BPE with byte fallback, <unk>=0, <s>=1, </s>=2, no pad), or a Hugging Face
// `tokenizer.json` (trainer/data/hf_tokenizer.h), behind one interface.
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

class HfTokenizer;

class Tokenizer {
 public:
  // `path`: a SentencePiece model file, a `.json` file (tokenizer.json), or a directory holding
  // tokenizer.json (else tokenizer.model). Throws DataError.
  explicit Tokenizer(const std::string& path);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  int64_t vocab_size() const;  // the largest id plus one
  // -1 when the tokenizer has none. For a tokenizer.json: the bos_token/eos_token of the
  // tokenizer_config.json beside it, else the special tokens its post-processor adds (BOS
  // before the text, EOS after), else a token named <s>/</s>, <|begin_of_text|>/<|end_of_text|>
  // or (EOS) <|endoftext|>.
  int bos_id() const;
  int eos_id() const;
  std::vector<uint32_t> encode(const std::string& text) const;  // no BOS/EOS added
  // With `add_special_tokens`: the special tokens of the tokenizer's template (a tokenizer.json's
  // post-processor; BOS first for SentencePiece), as transformers adds them.
  std::vector<uint32_t> encode(const std::string& text, bool add_special_tokens) const;
  std::string decode(const std::vector<int64_t>& ids) const;
  std::optional<int64_t> token_to_id(const std::string& token) const;
  std::optional<std::string> id_to_token(int64_t id) const;
  // The tokenizer file (for a directory, the file in it).
  const std::string& path() const { return path_; }
  // A Hugging Face tokenizer.json (not SentencePiece).
  bool is_tokenizer_json() const { return hf_ != nullptr; }

  // The same tokenizer as a Hugging Face `tokenizer.json` (a `tokenizers` BPE model with byte
  // fallback, the vocabulary in id order, the merges transformers derives from it, the dummy
  // prefix as a normalizer, BOS added by the post-processor, SentencePiece's decoding), which
  // encodes every text to the ids `encode` gives (BOS first) without SentencePiece or protobuf.
  // nullopt for a model this form cannot reproduce: not BPE, or with a normalisation other than
  // "identity" (extra whitespace removed, no dummy prefix). A tokenizer.json: its own text.
  std::optional<std::string> hf_tokenizer_json() const;

 private:
  std::string path_;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> processor_;
  std::unique_ptr<HfTokenizer> hf_;
  int bos_ = -1, eos_ = -1;
};

// Trains a tokenizer on `text_file` (one sentence per line) and writes `<model_prefix>.model`.
void train_tokenizer(const std::string& text_file, const std::string& model_prefix,
                     int64_t vocab_size);

}  // namespace strata
