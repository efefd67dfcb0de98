// Tokenizer: SentencePiece through the strata_spm module, loaded once per process with
// dlmopen into a fresh linker namespace.
#include "trainer/tokenizer.h"

#include <dlfcn.h>
#include <fmt/format.h>
#include <unistd.h>

#include <filesystem>
#include <limits>
#include <regex>

#include "trainer/token_shard.h"

namespace strata {
namespace {

namespace fs = std::filesystem;
constexpr const char* kModuleName = "libstrata_spm.so";

// The module's C interface (see trainer/sentencepiece_module.cpp).
struct SentencePieceApi {
  void* (*load)(const char*, char*, size_t);
  void (*free)(void*);
  int (*piece_size)(void*);
  int (*bos_id)(void*);
  int (*eos_id)(void*);
  long (*encode)(void*, const char*, size_t, char*, size_t);
  const int* (*ids)(void*);
  long (*decode)(void*, const int*, size_t, char*, size_t);
  const char* (*text)(void*);
  int (*train)(const char* const*, const char* const*, size_t, char*, size_t);
};

// The module sits next to the executable (build/ and installs), or where it was built.
fs::path find_module() {
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  std::vector<fs::path> candidates;
  if (!ec) candidates.push_back(exe.parent_path() / kModuleName);
  if (!ec) candidates.push_back(exe.parent_path().parent_path() / kModuleName);
  candidates.emplace_back(STRATA_SPM_MODULE);
  for (const fs::path& candidate : candidates) {
    if (fs::exists(candidate)) return candidate;
  }
  throw DataError(
      fmt::format("cannot find {} (looked next to the executable and at {})\nHINT: "
                  "rebuild Strata (scripts/build.sh); the module is part of the build",
                  kModuleName, STRATA_SPM_MODULE));
}

const SentencePieceApi& api() {
  static const SentencePieceApi instance = [] {
    const fs::path path = find_module();
    void* module = dlmopen(LM_ID_NEWLM, path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!module) {
      throw DataError(fmt::format("cannot load {}: {}", path.string(), dlerror()));
    }
    auto symbol = [&](const char* name) {
      void* address = dlsym(module, name);
      if (!address) {
        throw DataError(fmt::format("{} lacks {}\nHINT: rebuild Strata", path.string(), name));
      }
      return address;
    };
    SentencePieceApi a;
    a.load = reinterpret_cast<decltype(a.load)>(symbol("strata_spm_load"));
    a.free = reinterpret_cast<decltype(a.free)>(symbol("strata_spm_free"));
    a.piece_size = reinterpret_cast<decltype(a.piece_size)>(symbol("strata_spm_piece_size"));
    a.bos_id = reinterpret_cast<decltype(a.bos_id)>(symbol("strata_spm_bos_id"));
    a.eos_id = reinterpret_cast<decltype(a.eos_id)>(symbol("strata_spm_eos_id"));
    a.encode = reinterpret_cast<decltype(a.encode)>(symbol("strata_spm_encode"));
    a.ids = reinterpret_cast<decltype(a.ids)>(symbol("strata_spm_ids"));
    a.decode = reinterpret_cast<decltype(a.decode)>(symbol("strata_spm_decode"));
    a.text = reinterpret_cast<decltype(a.text)>(symbol("strata_spm_text"));
    a.train = reinterpret_cast<decltype(a.train)>(symbol("strata_spm_train"));
    return a;
  }();
  return instance;
}

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

Tokenizer::Tokenizer(const std::string& model_path) : path_(model_path), handle_(nullptr, nullptr) {
  if (!fs::is_regular_file(model_path)) {
    throw DataError(
        fmt::format("tokenizer {} does not exist\nHINT: point data.tokenizer (or "
                    "--tokenizer) at the tokenizer.model written by strata "
                    "prepare-data",
                    model_path));
  }
  char error[512] = {};
  void* handle = api().load(model_path.c_str(), error, sizeof(error));
  if (!handle) {
    const std::string message = status_message(error);
    throw DataError(
        fmt::format("cannot load tokenizer {}: {}\nHINT: it must be a SentencePiece "
                    "model file (the tokenizer.model written by strata "
                    "prepare-data, or a Llama-style one)",
                    model_path, message.empty() ? "not a SentencePiece model" : message));
  }
  handle_ = std::unique_ptr<void, void (*)(void*)>(handle, api().free);
}

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

int64_t Tokenizer::vocab_size() const {
  return api().piece_size(handle_.get());
}
int Tokenizer::bos_id() const {
  return api().bos_id(handle_.get());
}
int Tokenizer::eos_id() const {
  return api().eos_id(handle_.get());
}

std::vector<uint32_t> Tokenizer::encode(const std::string& text) const {
  char error[512] = {};
  const long count = api().encode(handle_.get(), text.data(), text.size(), error, sizeof(error));
  if (count < 0) throw DataError(fmt::format("tokenizer {} cannot encode text: {}", path_, error));
  const int* ids = api().ids(handle_.get());
  return std::vector<uint32_t>(ids, ids + count);
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids) const {
  std::vector<int> narrow;
  const int64_t size = vocab_size();
  for (int64_t id : ids) {
    if (id >= 0 && id < size) narrow.push_back(static_cast<int>(id));
  }
  char error[512] = {};
  const long length =
      api().decode(handle_.get(), narrow.data(), narrow.size(), error, sizeof(error));
  if (length < 0) throw DataError(fmt::format("tokenizer {} cannot decode ids: {}", path_, error));
  return std::string(api().text(handle_.get()), static_cast<size_t>(length));
}

void train_tokenizer(const std::string& text_file, const std::string& model_prefix,
                     int64_t vocab_size) {
  // Llama's conventions: BPE with byte fallback (no unknown bytes), digits split, text kept
  // as is (no normalisation, whitespace preserved), <unk>=0 <s>=1 </s>=2 and no pad.
  const std::vector<std::pair<std::string, std::string>> options = {
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
  std::vector<const char*> keys, values;
  for (const auto& [key, value] : options) {
    keys.push_back(key.c_str());
    values.push_back(value.c_str());
  }
  char error[1024] = {};
  if (api().train(keys.data(), values.data(), keys.size(), error, sizeof(error)) != 0) {
    throw DataError(training_error(error, text_file, vocab_size));
  }
}

}  // namespace strata
