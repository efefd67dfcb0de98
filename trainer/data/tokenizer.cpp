// Tokenizer: SentencePiece, linked directly. (Debian's LibTorch 1.13 loaded the system
// libprotobuf, whose symbols clashed with SentencePiece's private protobuf-lite, so SentencePiece
// had to run in a separate linker namespace; the PyTorch wheel links protobuf statically and
// shares no protobuf symbol with SentencePiece beyond three identical byteswap templates.)
#include "trainer/data/tokenizer.h"

#include <fmt/format.h>
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <stdexcept>
#include <string_view>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "checkpoint/json_file.h"
#include "trainer/data/hf_tokenizer.h"
#include "trainer/data/token_shard.h"

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

// The protobuf wire format, just enough to read the few fields of SentencePiece's ModelProto
// that decide whether a tokenizer.json can reproduce the model: calls visit(field, wire type,
// varint value, length-delimited bytes) for each field of `message`.
template <typename Visit>
void for_each_field(std::string_view message, Visit&& visit) {
  size_t pos = 0;
  auto varint = [&] {
    uint64_t value = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos >= message.size()) throw std::runtime_error("truncated varint");
      const auto byte = static_cast<uint8_t>(message[pos++]);
      value |= static_cast<uint64_t>(byte & 0x7f) << shift;
      if (!(byte & 0x80)) return value;
    }
    throw std::runtime_error("varint too long");
  };
  auto skip = [&](uint64_t n) {
    if (n > message.size() - pos) throw std::runtime_error("truncated field");
    pos += n;
  };
  while (pos < message.size()) {
    const uint64_t key = varint();
    const int field = static_cast<int>(key >> 3), wire = static_cast<int>(key & 7);
    if (wire == 0) {
      visit(field, wire, varint(), std::string_view());
    } else if (wire == 2) {
      const uint64_t n = varint();
      skip(n);
      visit(field, wire, 0, message.substr(pos - n, n));
    } else if (wire == 1 || wire == 5) {
      skip(wire == 1 ? 8 : 4);
    } else {
      throw std::runtime_error("unsupported wire type");
    }
  }
}

// What tokenizer.json needs to know of a SentencePiece model (sentencepiece_model.proto).
struct SpmFacts {
  uint64_t model_type = 1;  // TrainerSpec.model_type: UNIGRAM (the default) = 1, BPE = 2
  bool charsmap = false;    // NormalizerSpec.precompiled_charsmap is set: a normalisation
  bool add_dummy_prefix = true, remove_extra_whitespaces = true, escape_whitespaces = true;
};

SpmFacts spm_facts(std::string_view proto) {
  SpmFacts facts;
  for_each_field(proto, [&](int field, int wire, uint64_t, std::string_view bytes) {
    if (wire != 2) return;
    if (field == 2) {  // trainer_spec
      for_each_field(bytes, [&](int f, int w, uint64_t v, std::string_view) {
        if (f == 3 && w == 0) facts.model_type = v;
      });
    } else if (field == 3) {  // normalizer_spec
      for_each_field(bytes, [&](int f, int w, uint64_t v, std::string_view b) {
        if (f == 2 && w == 2) facts.charsmap = !b.empty();
        if (f == 3 && w == 0) facts.add_dummy_prefix = v != 0;
        if (f == 4 && w == 0) facts.remove_extra_whitespaces = v != 0;
        if (f == 5 && w == 0) facts.escape_whitespaces = v != 0;
      });
    }
  });
  return facts;
}

// Byte offsets of the UTF-8 code point boundaries strictly inside `s`.
std::vector<size_t> inner_boundaries(const std::string& s) {
  std::vector<size_t> out;
  for (size_t i = 1; i < s.size(); ++i) {
    if ((static_cast<uint8_t>(s[i]) & 0xC0) != 0x80) out.push_back(i);
  }
  return out;
}

size_t code_points(std::string_view s) {
  return static_cast<size_t>(std::count_if(
      s.begin(), s.end(), [](char c) { return (static_cast<uint8_t>(c) & 0xC0) != 0x80; }));
}

// The BOS and EOS of a tokenizer.json (see bos_id() in tokenizer.h).
std::pair<int, int> hf_special_ids(const HfTokenizer& hf, const fs::path& json_path) {
  auto id_of = [&](const std::string& token) {
    const std::optional<int64_t> id = hf.token_to_id(token);
    return id ? static_cast<int>(*id) : -1;
  };
  // A key of tokenizer_config.json decides (null: none); without it, the template, then names.
  int bos = hf.template_prefix().empty() ? -1 : static_cast<int>(hf.template_prefix().front());
  int eos = hf.template_suffix().empty() ? -1 : static_cast<int>(hf.template_suffix().back());
  for (const char* name : {"<s>", "<|begin_of_text|>"}) {
    if (bos < 0) bos = id_of(name);
  }
  for (const char* name : {"</s>", "<|end_of_text|>", "<|endoftext|>"}) {
    if (eos < 0) eos = id_of(name);
  }
  const fs::path config_path = json_path.parent_path() / "tokenizer_config.json";
  std::error_code ec;
  if (!fs::is_regular_file(config_path, ec)) return {bos, eos};
  nlohmann::json config;
  try {
    config = read_json_file(config_path.string(), 64ull << 20);
  } catch (const std::exception& e) {
    throw DataError(fmt::format("cannot read the tokenizer's {}", e.what()));
  }
  if (!config.is_object()) {
    throw DataError(fmt::format("{} must be a JSON object", config_path.string()));
  }
  auto token = [&](const char* key, int* id) {
    const auto it = config.find(key);
    if (it == config.end()) return;
    if (it->is_null()) {
      *id = -1;
      return;
    }
    const nlohmann::json& value =
        it->is_object() && it->contains("content") ? (*it)["content"] : *it;
    if (!value.is_string()) {
      throw DataError(fmt::format("{}: {} must be a token (a string or {{\"content\": ...}})",
                                  config_path.string(), key));
    }
    *id = id_of(value.get<std::string>());
    if (*id < 0) {
      throw DataError(fmt::format("{}: {} {} is not a token of {}", config_path.string(), key,
                                  value.dump(), json_path.string()));
    }
  };
  token("bos_token", &bos);
  token("eos_token", &eos);
  return {bos, eos};
}

}  // namespace

Tokenizer::Tokenizer(const std::string& model_path) : path_(model_path) {
  std::error_code ec;
  if (fs::is_directory(model_path, ec)) {
    const fs::path dir(model_path);
    if (fs::is_regular_file(dir / "tokenizer.json", ec)) {
      path_ = (dir / "tokenizer.json").string();
    } else if (fs::is_regular_file(dir / "tokenizer.model", ec)) {
      path_ = (dir / "tokenizer.model").string();
    } else {
      throw DataError(
          fmt::format("tokenizer directory {} holds neither tokenizer.json nor tokenizer.model\n"
                      "HINT: point --tokenizer at a Hugging Face model directory, a tokenizer.json "
                      "or a SentencePiece tokenizer.model",
                      model_path));
    }
  }
  if (fs::path(path_).extension() == ".json") {
    if (!fs::is_regular_file(path_, ec)) {
      throw DataError(fmt::format("tokenizer {} does not exist", path_));
    }
    hf_ = std::make_unique<HfTokenizer>(path_);
    std::tie(bos_, eos_) = hf_special_ids(*hf_, fs::path(path_));
    return;
  }
  processor_ = std::make_unique<sentencepiece::SentencePieceProcessor>();
  if (!fs::is_regular_file(path_)) {
    throw DataError(
        fmt::format("tokenizer {} does not exist\nHINT: point data.tokenizer (or "
                    "--tokenizer) at the tokenizer.model written by strata "
                    "prepare-data",
                    path_));
  }
  const auto status = processor_->Load(path_);
  if (!status.ok()) {
    const std::string message = status_message(status.ToString());
    throw DataError(
        fmt::format("cannot load tokenizer {}: {}\nHINT: it must be a SentencePiece "
                    "model file (the tokenizer.model written by strata "
                    "prepare-data, or a Llama-style one)",
                    path_, message.empty() ? "not a SentencePiece model" : message));
  }
  bos_ = processor_->bos_id();
  eos_ = processor_->eos_id();
}

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

int64_t Tokenizer::vocab_size() const {
  return hf_ ? hf_->vocab_size() : processor_->GetPieceSize();
}
int Tokenizer::bos_id() const {
  return bos_;
}
int Tokenizer::eos_id() const {
  return eos_;
}

std::vector<uint32_t> Tokenizer::encode(const std::string& text, bool add_special_tokens) const {
  if (hf_) return hf_->encode(text, add_special_tokens);
  std::vector<uint32_t> ids = encode(text);
  if (add_special_tokens && bos_ >= 0) ids.insert(ids.begin(), static_cast<uint32_t>(bos_));
  return ids;
}

std::optional<int64_t> Tokenizer::token_to_id(const std::string& token) const {
  if (hf_) return hf_->token_to_id(token);
  const int id = processor_->PieceToId(token);
  // SentencePiece maps an unknown piece to <unk>.
  if (id < 0 || (id == processor_->unk_id() && processor_->IdToPiece(id) != token))
    return std::nullopt;
  return id;
}

std::optional<std::string> Tokenizer::id_to_token(int64_t id) const {
  if (hf_) return hf_->id_to_token(id);
  if (id < 0 || id >= vocab_size()) return std::nullopt;
  return processor_->IdToPiece(static_cast<int>(id));
}

std::vector<uint32_t> Tokenizer::encode(const std::string& text) const {
  if (hf_) return hf_->encode(text, false);
  std::vector<int> ids;
  const auto status = processor_->Encode(text, &ids);
  if (!status.ok()) {
    throw DataError(fmt::format("tokenizer {} cannot encode text: {}", path_, status.ToString()));
  }
  return std::vector<uint32_t>(ids.begin(), ids.end());
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids) const {
  if (hf_) return hf_->decode(ids);
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

std::optional<std::string> Tokenizer::hf_tokenizer_json() const {
  if (hf_) {
    std::ifstream in(path_, std::ios::binary);
    std::ostringstream text;
    text << in.rdbuf();
    if (!in) throw DataError(fmt::format("cannot read {}", path_));
    return text.str();
  }
  SpmFacts facts;
  try {
    facts = spm_facts(processor_->serialized_model_proto());
  } catch (const std::runtime_error&) {
    return std::nullopt;
  }
  if (facts.model_type != 2 || facts.charsmap || !facts.add_dummy_prefix ||
      facts.remove_extra_whitespaces || !facts.escape_whitespaces) {
    return std::nullopt;
  }
  const int n = processor_->GetPieceSize();
  std::vector<std::string> pieces(n);
  std::unordered_map<std::string, int> id_of;
  std::unordered_set<std::string> special;  // control and unknown pieces: never built from text
  nlohmann::ordered_json added = nlohmann::ordered_json::array();
  for (int id = 0; id < n; ++id) {
    pieces[id] = processor_->IdToPiece(id);
    if (pieces[id].empty() || pieces[id].find(' ') != std::string::npos)
      return std::nullopt;  // merges are "left right"
    id_of[pieces[id]] = id;
    if (processor_->IsControl(id) || processor_->IsUnknown(id)) {
      special.insert(pieces[id]);
      added.push_back({{"id", id},
                       {"content", pieces[id]},
                       {"single_word", false},
                       {"lstrip", false},
                       {"rstrip", false},
                       {"normalized", false},
                       {"special", true}});
    }
  }
  // The merges transformers derives from a SentencePiece BPE vocabulary: every split of a
  // piece into two pieces, ordered by the merged piece's id (its BPE rank), then by the
  // halves' lengths in code points; splits of one piece by the halves' ids.
  struct Merge {
    int rank;
    size_t left_len, right_len;
    std::string left, right;
  };
  std::vector<Merge> merges;
  for (int id = 0; id < n; ++id) {
    const std::string& piece = pieces[id];
    if (special.count(piece)) continue;
    std::vector<Merge> local;
    for (size_t cut : inner_boundaries(piece)) {
      std::string left = piece.substr(0, cut), right = piece.substr(cut);
      if (special.count(left) || special.count(right) || !id_of.count(left) || !id_of.count(right))
        continue;
      local.push_back(
          {id, code_points(left), code_points(right), std::move(left), std::move(right)});
    }
    std::stable_sort(local.begin(), local.end(), [&](const Merge& a, const Merge& b) {
      return std::pair(id_of.at(a.left), id_of.at(a.right)) <
             std::pair(id_of.at(b.left), id_of.at(b.right));
    });
    for (Merge& m : local) merges.push_back(std::move(m));
  }
  std::stable_sort(merges.begin(), merges.end(), [](const Merge& a, const Merge& b) {
    return std::tuple(a.rank, a.left_len, a.right_len) <
           std::tuple(b.rank, b.left_len, b.right_len);
  });

  const std::string space = "\u2581";  // SentencePiece's whitespace symbol
  nlohmann::ordered_json merge_list = nlohmann::ordered_json::array();
  for (const Merge& m : merges) merge_list.push_back(m.left + " " + m.right);  // pieces hold no ' '
  const std::string bos = bos_id() >= 0 ? pieces[bos_id()] : "";
  nlohmann::ordered_json post = nullptr;
  if (bos_id() >= 0) {
    post = {{"type", "TemplateProcessing"},
            {"single",
             {{{"SpecialToken", {{"id", bos}, {"type_id", 0}}}},
              {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
            {"pair",
             {{{"SpecialToken", {{"id", bos}, {"type_id", 0}}}},
              {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
              {{"SpecialToken", {{"id", bos}, {"type_id", 1}}}},
              {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}}},
            {"special_tokens", {{bos, {{"id", bos}, {"ids", {bos_id()}}, {"tokens", {bos}}}}}}};
  }
  nlohmann::ordered_json j;
  j["version"] = "1.0";
  j["truncation"] = nullptr;
  j["padding"] = nullptr;
  j["added_tokens"] = added;
  // SentencePiece's dummy prefix: always one space symbol before the text, spaces escaped.
  j["normalizer"] = {{"type", "Sequence"},
                     {"normalizers",
                      {{{"type", "Prepend"}, {"prepend", space}},
                       {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", space}}}}};
  j["pre_tokenizer"] = nullptr;
  j["post_processor"] = post;
  j["decoder"] = {{"type", "Sequence"},
                  {"decoders",
                   {{{"type", "Replace"}, {"pattern", {{"String", space}}}, {"content", " "}},
                    {{"type", "ByteFallback"}},
                    {{"type", "Fuse"}},
                    {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}};
  j["model"] = {
      {"type", "BPE"},
      {"dropout", nullptr},
      {"unk_token", processor_->unk_id() >= 0 ? nlohmann::ordered_json(pieces[processor_->unk_id()])
                                              : nlohmann::ordered_json(nullptr)},
      {"continuing_subword_prefix", nullptr},
      {"end_of_word_suffix", nullptr},
      {"fuse_unk", true},
      {"byte_fallback", true},
      {"vocab", "@VOCAB@"},
      {"merges", merge_list}};
  try {
    // The vocabulary in id order, written directly (an ordered_json object looks keys up linearly).
    std::string vocab = "{";
    for (int id = 0; id < n; ++id) {
      vocab +=
          fmt::format("{}\n      {}: {}", id ? "," : "", nlohmann::json(pieces[id]).dump(), id);
    }
    vocab += "\n    }";
    std::string text = j.dump(2) + "\n";
    const std::string placeholder = "\"@VOCAB@\"";
    return text.replace(text.find(placeholder), placeholder.size(), vocab);
  } catch (const nlohmann::json::exception&) {  // a piece that is not UTF-8
    return std::nullopt;
  }
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
