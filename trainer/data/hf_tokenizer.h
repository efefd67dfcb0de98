// A Hugging Face `tokenizer.json` tokenizer (the `tokenizers` library's format) in C++: a BPE
// model (byte-level as GPT-2, Llama 3, Qwen; or Metaspace with byte fallback as Llama 2,
// Mistral) behind its added tokens, normalizers, pre-tokenizers, post-processor and decoders,
// giving the ids and the decoded text `tokenizers` gives. What it does not implement it refuses
// when the file is loaded (a DataError naming the component and its JSON path): it never
// tokenizes differently.
//
// Supported: model BPE (merges as "a b" strings or ["a", "b"] pairs, ignore_merges,
// byte_fallback, unk_token with fuse_unk, no dropout, no subword prefix/suffix); normalizers
// NFC, NFD, NFKC, NFKD (by ICU), Prepend, Replace (string pattern), Sequence; pre-tokenizers
// ByteLevel, Split (regex or string pattern, every behaviour, invert), Metaspace, Digits, Sequence;
// post-processors TemplateProcessing, ByteLevel, Sequence; decoders ByteLevel, Metaspace,
// ByteFallback, Fuse, Strip, Replace (string pattern), Sequence; added tokens with
// lstrip/rstrip/normalized. A text that is not valid UTF-8 is encoded as its UTF-8 decoding with
// each invalid sequence replaced by U+FFFD (Python's errors="replace").
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace strata {

class HfTokenizer {
 public:
  // Loads `path` (a tokenizer.json); throws DataError naming the file.
  explicit HfTokenizer(const std::string& path);
  ~HfTokenizer();
  HfTokenizer(HfTokenizer&&) noexcept;
  HfTokenizer& operator=(HfTokenizer&&) noexcept;

  // `tokenizers.Tokenizer.encode(text, add_special_tokens=...)`.ids. Thread-safe.
  std::vector<uint32_t> encode(const std::string& text, bool add_special_tokens) const;
  // `tokenizers.Tokenizer.decode(ids, skip_special_tokens=False)`; unknown ids are skipped.
  std::string decode(const std::vector<int64_t>& ids) const;

  int64_t vocab_size() const;  // the largest id of the vocabulary and added tokens, plus one
  std::optional<int64_t> token_to_id(const std::string& token) const;
  std::optional<std::string> id_to_token(int64_t id) const;
  // The ids the post-processor's single-sequence template adds before and after the text.
  const std::vector<uint32_t>& template_prefix() const;
  const std::vector<uint32_t>& template_suffix() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace strata
