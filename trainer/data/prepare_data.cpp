// `strata prepare-data`: gather text, split documents into train/val, train or reuse a
// tokenizer, write token shards and meta.json.
//
// The text is read file by file in three passes (count documents, write the tokenizer's
// training text, encode), so memory holds one input file and one shard of tokens at a time,
// not the corpus. Every output is first written under a pending name and renamed only when
// the whole run succeeded: a failed run leaves an earlier output directory as it was.
#include "trainer/data/prepare_data.h"

#include "checkpoint/file_io.h"

#include <fmt/format.h>
#include <glob.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>
#include <string_view>

#include "trainer/seed.h"
#include "trainer/data/token_shard.h"
#include "trainer/data/tokenizer.h"

namespace strata {
namespace {

namespace fs = std::filesystem;

constexpr const char* kInputHint =
    "HINT: --input takes text files, directories (searched recursively) and glob patterns "
    "(quote them so the shell leaves them to strata)";

bool looks_binary(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  char buffer[8192];
  in.read(buffer, sizeof(buffer));
  return std::find(buffer, buffer + in.gcount(), '\0') != buffer + in.gcount();
}

bool is_hidden(const fs::path& path) {
  const std::string name = path.filename().string();
  return !name.empty() && name.front() == '.';
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  if (in) text << in.rdbuf();
  if (!in || in.bad()) {
    throw DataError(fmt::format("cannot read input {}: {}", path.string(), std::strerror(errno)));
  }
  return text.str();
}

struct InputFiles {
  std::vector<fs::path> files;
  int64_t skipped = 0;  // binary, .dat, hidden, or already listed
};

// Files, directories (recursed, sorted) and glob patterns, in input order, each file once.
// Inside directories and pattern matches, files that look binary (a NUL byte in the first
// 8 KiB), `.dat` files (fortune's indexes) and hidden files are skipped; a file named
// explicitly must be text. `exclude` (the output directory) is never searched.
InputFiles gather_inputs(const std::vector<std::string>& inputs, const fs::path& exclude) {
  InputFiles out;
  std::set<fs::path> seen;
  auto add_file = [&](const fs::path& path) {
    const bool listed = !seen.insert(fs::weakly_canonical(path)).second;
    if (!listed) out.files.push_back(path);
    return !listed;
  };
  auto add_found = [&](const fs::path& path) {
    if (is_hidden(path) || path.extension() == ".dat" || looks_binary(path) || !add_file(path)) {
      ++out.skipped;
      return false;
    }
    return true;
  };
  auto add_directory = [&](const fs::path& dir) -> int64_t {
    std::vector<fs::path> found;
    std::error_code ec;
    if (fs::weakly_canonical(dir) == exclude) return 0;
    fs::recursive_directory_iterator it(dir, fs::directory_options::skip_permission_denied, ec);
    for (; !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
      const fs::path& path = it->path();
      std::error_code entry_ec;  // a broken link is not an error: it is no regular file
      if (it->is_directory(entry_ec)) {
        if (is_hidden(path) || fs::weakly_canonical(path) == exclude) {
          it.disable_recursion_pending();
        }
      } else if (it->is_regular_file(entry_ec)) {
        found.push_back(path);
      }
    }
    if (ec) {
      throw DataError(
          fmt::format("cannot list input directory {}: {}", dir.string(), ec.message()));
    }
    std::sort(found.begin(), found.end());
    int64_t added = 0;
    for (const fs::path& path : found) added += add_found(path);
    return added;
  };

  for (const std::string& input : inputs) {
    std::error_code ec;
    const fs::file_status status = fs::status(input, ec);
    const int64_t skipped_before = out.skipped;
    if (fs::is_directory(status)) {
      if (add_directory(input) == 0) {
        throw DataError(
            fmt::format("input directory {} holds no text files ({} skipped: binary, "
                        ".dat, hidden or already listed)\n{}",
                        input, out.skipped - skipped_before, kInputHint));
      }
    } else if (fs::is_regular_file(status)) {
      if (looks_binary(input)) {
        throw DataError(
            fmt::format("input {} is not a text file (it has NUL bytes)\n{}", input, kInputHint));
      }
      if (!add_file(input)) ++out.skipped;
    } else if (fs::exists(status)) {
      throw DataError(
          fmt::format("input {} is not a regular file or directory\n{}", input, kInputHint));
    } else if (input.find_first_of("*?[") == std::string::npos) {
      throw DataError(fmt::format("input {} does not exist\n{}", input, kInputHint));
    } else {
      glob_t matches{};
      const int rc = glob(input.c_str(), 0, nullptr, &matches);
      std::vector<fs::path> found;
      for (size_t i = 0; rc == 0 && i < matches.gl_pathc; ++i)
        found.emplace_back(matches.gl_pathv[i]);
      globfree(&matches);
      if (found.empty()) {
        throw DataError(fmt::format("input pattern '{}' matches nothing\n{}", input, kInputHint));
      }
      int64_t added = 0;
      for (const fs::path& path : found) {
        if (fs::is_directory(path, ec)) {
          added += add_directory(path);
        } else if (fs::is_regular_file(path, ec)) {
          added += add_found(path);
        }
      }
      if (added == 0) {
        throw DataError(
            fmt::format("input pattern '{}' matches no text file ({} skipped: "
                        "binary, .dat, hidden or already listed)\n{}",
                        input, out.skipped - skipped_before, kInputHint));
      }
    }
  }
  return out;
}

// Calls `visit(document)` for each non-blank document of `text`: the whole text, or with a
// separator the pieces between lines equal to it (a trailing '\r' is ignored).
template <typename Visit>
void for_each_document(std::string_view text, const std::optional<std::string>& separator,
                       Visit&& visit) {
  auto emit = [&](std::string_view document) {
    if (document.find_first_not_of(" \t\r\n") != std::string_view::npos) visit(document);
  };
  if (!separator) {
    emit(text);
    return;
  }
  size_t document_begin = 0;
  for (size_t pos = 0; pos < text.size();) {
    const size_t newline = text.find('\n', pos);
    const size_t next = newline == std::string_view::npos ? text.size() : newline + 1;
    std::string_view line =
        text.substr(pos, (newline == std::string_view::npos ? text.size() : newline) - pos);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line == *separator) {
      emit(text.substr(document_begin, pos - document_begin));
      document_begin = next;
    }
    pos = next;
  }
  emit(text.substr(document_begin));
}

// Calls `visit(index, document)` for every document of every file, indices counting from 0.
template <typename Visit>
void for_each_document(const InputFiles& inputs, const std::optional<std::string>& separator,
                       Visit&& visit) {
  int64_t index = 0;
  for (const fs::path& file : inputs.files) {
    const std::string text = read_text(file);
    for_each_document(text, separator, [&](std::string_view doc) { visit(index++, doc); });
  }
}

// Train/val assignment by a hash of (seed, document index), so a document's side does not
// depend on the other documents; at least one document goes to train, and one to val when
// val_fraction > 0 and there are two documents or more.
class DocumentSplit {
 public:
  DocumentSplit(uint64_t seed, double val_fraction, int64_t documents)
      : seed_(splitmix64(seed)), val_fraction_(val_fraction) {
    for (int64_t i = 0; i < documents; ++i) val_documents_ += drawn_val(i);
    if (val_fraction > 0 && val_documents_ == 0 && documents >= 2) {
      forced_val_ = documents - 1;
      val_documents_ = 1;
    }
    if (val_documents_ == documents) {
      forced_train_ = 0;
      --val_documents_;
    }
  }
  bool is_val(int64_t index) const {
    if (index == forced_val_) return true;
    if (index == forced_train_) return false;
    return drawn_val(index);
  }
  int64_t val_documents() const { return val_documents_; }

 private:
  bool drawn_val(int64_t index) const {
    const uint64_t h = splitmix64(seed_ ^ static_cast<uint64_t>(index));
    return static_cast<double>(h >> 11) * 0x1.0p-53 < val_fraction_;
  }
  uint64_t seed_;
  double val_fraction_;
  int64_t val_documents_ = 0;
  int64_t forced_val_ = -1;
  int64_t forced_train_ = -1;
};

// Outputs are written as `.pending-<name>` in the output directory and renamed to `<name>`
// by commit(); whatever was not committed is removed when the Staging goes away.
class Staging {
 public:
  explicit Staging(fs::path dir) : dir_(std::move(dir)) {}
  ~Staging() {
    std::error_code ec;
    for (const std::string& name : names_) fs::remove(pending(name), ec);
    for (const fs::path& path : scratch_) fs::remove(path, ec);
  }
  Staging(const Staging&) = delete;
  Staging& operator=(const Staging&) = delete;

  // The pending path of output `name` (registered for commit).
  fs::path add(const std::string& name) {
    names_.push_back(name);
    return pending(name);
  }
  // A temporary file that is always removed.
  fs::path scratch(const std::string& name) { return scratch_.emplace_back(dir_ / name); }
  fs::path pending(const std::string& name) const { return dir_ / (".pending-" + name); }
  fs::path final_path(const std::string& name) const { return dir_ / name; }

  void commit() {
    for (const std::string& name : names_) {
      std::error_code ec;
      fs::rename(pending(name), final_path(name), ec);
      if (ec) {
        throw DataError(fmt::format("cannot rename {} to {}: {}", pending(name).string(),
                                    final_path(name).string(), ec.message()));
      }
    }
    names_.clear();
  }

 private:
  fs::path dir_;
  std::vector<std::string> names_;
  std::vector<fs::path> scratch_;
};

// One split's tokens, written as shards `<split>_NNNNNN.bin` of `shard_tokens` tokens each
// (documents may continue into the next shard, as in llm.c).
class ShardWriter {
 public:
  ShardWriter(Staging& staging, std::string split, int64_t shard_tokens, int64_t vocab_size)
      : staging_(staging),
        split_(std::move(split)),
        shard_tokens_(shard_tokens),
        vocab_size_(vocab_size) {}

  void add(const std::vector<uint32_t>& tokens) {
    for (size_t begin = 0; begin < tokens.size();) {
      const size_t room = static_cast<size_t>(shard_tokens_) - buffer_.size();
      const size_t take = std::min(room, tokens.size() - begin);
      buffer_.insert(buffer_.end(), tokens.begin() + begin, tokens.begin() + begin + take);
      begin += take;
      if (buffer_.size() == static_cast<size_t>(shard_tokens_)) flush();
    }
  }
  void finish() {
    if (!buffer_.empty()) flush();
  }
  int64_t tokens() const { return tokens_; }
  const std::vector<std::string>& names() const { return names_; }

 private:
  void flush() {
    const std::string name = fmt::format("{}_{:06d}.bin", split_, names_.size());
    write_token_shard(staging_.add(name).string(), buffer_, vocab_size_);
    names_.push_back(name);
    tokens_ += static_cast<int64_t>(buffer_.size());
    buffer_.clear();
  }
  Staging& staging_;
  std::string split_;
  int64_t shard_tokens_;
  int64_t vocab_size_;
  std::vector<uint32_t> buffer_;
  std::vector<std::string> names_;
  int64_t tokens_ = 0;
};

double unigram_entropy_nats(const std::vector<int64_t>& counts) {
  int64_t total = 0;
  for (int64_t c : counts) total += c;
  double entropy = 0.0;
  for (int64_t c : counts) {
    if (c == 0) continue;
    const double p = static_cast<double>(c) / static_cast<double>(total);
    entropy -= p * std::log(p);
  }
  return entropy;
}

// Shards of an earlier run that this run did not rewrite (a train_*.bin glob would find them).
void remove_stale_shards(const fs::path& dir, const std::set<std::string>& keep) {
  const std::regex shard_name(R"((train|val)_\d{6}\.(bin|mask))");
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (std::regex_match(name, shard_name) && keep.count(name) == 0) fs::remove(entry.path(), ec);
  }
}

void write_json_atomically(const fs::path& path, const nlohmann::json& value) {
  try {
    write_file_atomic(path.string(), value.dump(2) + "\n");
  } catch (const IoError& e) {
    throw DataError(e.what());
  }
}

void copy_file_to(const fs::path& from, const fs::path& to) {
  std::error_code ec;
  fs::copy_file(from, to, fs::copy_options::overwrite_existing, ec);
  if (ec) {
    throw DataError(
        fmt::format("cannot copy {} to {}: {}", from.string(), to.string(), ec.message()));
  }
}

}  // namespace

namespace {

// The options' own ranges, before anything is read or written.
void check_options(const PrepareDataOptions& options) {
  if (!(options.val_fraction >= 0.0 && options.val_fraction < 1.0)) {
    throw DataError(
        fmt::format("--val-fraction {} is out of range\nHINT: use a value in [0, 1), "
                    "e.g. 0.05",
                    options.val_fraction));
  }
  if (options.shard_tokens <= 0) {
    throw DataError(fmt::format("--shard-tokens {} must be positive", options.shard_tokens));
  }
  if (!options.tokenizer && options.vocab_size < 260) {
    throw DataError(
        fmt::format("--vocab-size {} is too small: a byte-fallback tokenizer needs "
                    "256 byte pieces and 3 special pieces\nHINT: use at least 260",
                    options.vocab_size));
  }
  if (options.inputs.empty()) throw DataError(fmt::format("no --input given\n{}", kInputHint));
  if (options.out_dir.empty()) throw DataError("no --out directory given");
}

// Tokenizer: reuse (copied into the output unless it is already there), or train one on the
// train documents. Returns the staged tokenizer.model (tokenizer.json for a Hugging Face
// tokenizer, with the tokenizer_config.json and special_tokens_map.json beside it);
// `stale_vocab_file`: a reused tokenizer without its .vocab beside it (the output's old one
// must go); `final_name`: the tokenizer's name in the output.
fs::path stage_tokenizer(const PrepareDataOptions& options, const InputFiles& inputs,
                         const DocumentSplit& split, Staging& staging, bool* stale_vocab_file,
                         std::string* final_name) {
  std::error_code ec;
  *final_name = "tokenizer.model";
  if (options.tokenizer) {
    const Tokenizer check(*options.tokenizer);  // fails early with a clear message
    if (check.is_tokenizer_json()) {
      *final_name = "tokenizer.json";
      const fs::path source = check.path();
      const fs::path tokenizer_path = staging.final_path(*final_name);
      if (fs::equivalent(source, tokenizer_path, ec)) return tokenizer_path;
      const fs::path staged = staging.add(*final_name);
      copy_file_to(source, staged);
      for (const char* name : {"tokenizer_config.json", "special_tokens_map.json"}) {
        if (fs::is_regular_file(source.parent_path() / name, ec))
          copy_file_to(source.parent_path() / name, staging.add(name));
      }
      return staged;
    }
  }
  const fs::path tokenizer_path = staging.final_path("tokenizer.model");
  fs::path staged_tokenizer = tokenizer_path;
  if (options.tokenizer) {
    const std::string source = Tokenizer(*options.tokenizer).path();  // a directory's file
    if (!fs::equivalent(source, tokenizer_path, ec)) {
      staged_tokenizer = staging.add("tokenizer.model");
      copy_file_to(source, staged_tokenizer);
      const fs::path vocab_file = fs::path(source).replace_extension(".vocab");
      if (fs::is_regular_file(vocab_file, ec)) {
        copy_file_to(vocab_file, staging.add("tokenizer.vocab"));
      } else {
        *stale_vocab_file = true;
      }
    }
  } else {
    const fs::path corpus = staging.scratch(".pending-tokenizer-corpus.txt");
    {
      std::ofstream text(corpus, std::ios::trunc);
      for_each_document(inputs, options.separator, [&](int64_t i, std::string_view doc) {
        if (!split.is_val(i)) text << doc << '\n';
      });
      if (!text) {
        throw DataError(fmt::format("cannot write {}: {}\nHINT: check free disk space",
                                    corpus.string(), std::strerror(errno)));
      }
    }
    staged_tokenizer = staging.add("tokenizer.model");
    staging.add("tokenizer.vocab");
    const fs::path prefix = staging.pending("tokenizer");  // SentencePiece adds .model/.vocab
    train_tokenizer(corpus.string(), prefix.string(), options.vocab_size);
  }
  return staged_tokenizer;
}

// Packed windows of one split, written as `<split>_NNNNNN.bin` with its `.mask` companion,
// whole windows per shard (as many as fit in shard_tokens, at least one).
class PackedShardWriter {
 public:
  PackedShardWriter(Staging& staging, std::string split, int64_t shard_tokens, int64_t window,
                    int64_t vocab_size)
      : staging_(staging),
        split_(std::move(split)),
        windows_per_shard_(std::max<int64_t>(1, shard_tokens / window)),
        window_(window),
        vocab_size_(vocab_size) {}

  void add(const std::vector<uint32_t>& tokens, const std::vector<uint8_t>& mask) {
    tokens_.insert(tokens_.end(), tokens.begin(), tokens.end());
    mask_.insert(mask_.end(), mask.begin(), mask.end());
    if (static_cast<int64_t>(tokens_.size()) == windows_per_shard_ * window_) flush();
  }
  void finish() {
    if (!tokens_.empty()) flush();
  }
  const std::vector<std::string>& names() const { return names_; }    // shards and masks
  const std::vector<std::string>& shards() const { return shards_; }  // the .bin files

 private:
  void flush() {
    const std::string name = fmt::format("{}_{:06d}", split_, shards_.size());
    const auto window = static_cast<int32_t>(window_);
    write_token_shard(staging_.add(name + ".bin").string(), tokens_, vocab_size_, window);
    write_mask_shard(staging_.add(name + ".mask").string(), mask_, window);
    shards_.push_back(name + ".bin");
    names_.push_back(name + ".bin");
    names_.push_back(name + ".mask");
    tokens_.clear();
    mask_.clear();
  }
  Staging& staging_;
  std::string split_;
  int64_t windows_per_shard_, window_, vocab_size_;
  std::vector<uint32_t> tokens_;
  std::vector<uint8_t> mask_;
  std::vector<std::string> names_, shards_;
};

// Every non-blank line of the input files, with "file:line" for messages.
void for_each_record(
    const InputFiles& inputs,
    const std::function<void(int64_t, const std::string&, const std::string&)>& fn) {
  int64_t index = 0;
  for (const fs::path& file : inputs.files) {
    std::istringstream lines(read_text(file));
    int64_t number = 0;
    for (std::string line; std::getline(lines, line);) {
      ++number;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      fn(index++, line, fmt::format("{}:{}", file.string(), number));
    }
  }
}

// `prepare-data --format jsonl`: records -> tokens + loss mask -> packed windows.
PrepareDataResult prepare_jsonl(const PrepareDataOptions& options) {
  if (!options.tokenizer) {
    throw DataError(
        "--format jsonl needs --tokenizer: the model's tokenizer (tokenizer.json, "
        "tokenizer.model, or the model's directory)\nHINT: fine-tuning data is tokenized with "
        "the tokenizer of the model it fine-tunes");
  }
  if (options.seq_len <= 0) {
    throw DataError(fmt::format(
        "--format jsonl needs --seq-len (the run's data.seq_len) to pack records into windows; "
        "got {}",
        options.seq_len));
  }
  if (options.overlong != "truncate" && options.overlong != "drop") {
    throw DataError(fmt::format("--overlong '{}' is not one of: truncate, drop", options.overlong));
  }
  const fs::path out(options.out_dir);
  const InputFiles inputs = gather_inputs(options.inputs, fs::weakly_canonical(out));
  int64_t records = 0;
  for_each_record(inputs, [&](int64_t, const std::string&, const std::string&) { ++records; });
  if (records == 0) {
    throw DataError(
        fmt::format("the {} input file(s) hold no JSONL records\nHINT: check the "
                    "--input paths (one JSON object per line)",
                    inputs.files.size()));
  }
  const DocumentSplit split(options.seed, options.val_fraction, records);

  const Tokenizer tokenizer(*options.tokenizer);
  // The chat template: the given file (a template, or a tokenizer_config.json), else the
  // tokenizer's own tokenizer_config.json when it has a chat_template.
  std::optional<ChatTemplate> chat;
  ChatTemplateOptions chat_options;
  PrepareDataResult result;
  {
    const fs::path tokenizer_dir = fs::is_directory(*options.tokenizer)
                                       ? fs::path(*options.tokenizer)
                                       : fs::path(*options.tokenizer).parent_path();
    std::optional<ChatTemplateSource> source;
    if (options.chat_template) {
      const fs::path given(*options.chat_template);
      if (fs::is_directory(given) || given.extension() == ".json") {
        source = load_chat_template(given.string());
      } else {
        source = ChatTemplateSource{read_text(given), given.string(), "", ""};
      }
    } else if (fs::exists(tokenizer_dir / "tokenizer_config.json")) {
      try {
        source = load_chat_template((tokenizer_dir / "tokenizer_config.json").string());
      } catch (const DataError&) {
        // no chat_template there: "messages" records are refused when they come
      }
    }
    if (source) {
      chat.emplace(source->source, source->origin);
      result.chat_template = source->origin;
      chat_options.bos_token = source->bos_token;
      chat_options.eos_token = source->eos_token;
    }
    // The special tokens' strings as the tokenizer spells them, where the source names none.
    if (chat_options.bos_token.empty() && tokenizer.bos_id() >= 0)
      chat_options.bos_token = tokenizer.id_to_token(tokenizer.bos_id()).value_or("");
    if (chat_options.eos_token.empty() && tokenizer.eos_id() >= 0)
      chat_options.eos_token = tokenizer.id_to_token(tokenizer.eos_id()).value_or("");
  }
  if (tokenizer.eos_id() < 0) {
    throw DataError(fmt::format(
        "tokenizer {} has no EOS token, which ends each record and pads the windows\nHINT: use "
        "the model's own tokenizer (with its tokenizer_config.json naming eos_token)",
        *options.tokenizer));
  }
  const RecordEncoder encoder(tokenizer, chat ? &*chat : nullptr, chat_options);

  std::error_code ec;
  fs::create_directories(out, ec);
  if (ec || !fs::is_directory(out)) {
    throw DataError(fmt::format(
        "cannot create output directory {}: {}\nHINT: check the --out path and its permissions",
        out.string(), ec ? ec.message() : "a file of that name exists"));
  }
  Staging staging(out);
  const int64_t window = options.seq_len + 1, vocab_size = tokenizer.vocab_size();
  const bool truncate = options.overlong == "truncate";
  const auto pad = static_cast<uint32_t>(tokenizer.eos_id());
  PackedShardWriter train_shards(staging, "train", options.shard_tokens, window, vocab_size);
  PackedShardWriter val_shards(staging, "val", options.shard_tokens, window, vocab_size);
  WindowPacker train(window, truncate, pad,
                     [&](const auto& t, const auto& m) { train_shards.add(t, m); });
  WindowPacker val(window, truncate, pad,
                   [&](const auto& t, const auto& m) { val_shards.add(t, m); });
  for_each_record(inputs, [&](int64_t i, const std::string& line, const std::string& where) {
    EncodedRecord record = encoder.encode(line, where);
    if (record.targets() == 0) {
      ++result.records_without_targets;
      return;
    }
    (split.is_val(i) ? val : train).add(std::move(record));
  });
  train.finish();
  val.finish();
  train_shards.finish();
  val_shards.finish();
  if (train.stats().windows == 0) {
    throw DataError(fmt::format(
        "no training window: of {} records, {} have no target token and {} are longer than "
        "--seq-len {} + 1 tokens and were dropped\nHINT: check the records' kinds, or use "
        "--overlong truncate or a larger --seq-len",
        records, result.records_without_targets, train.stats().dropped, options.seq_len));
  }

  staging.commit();
  std::set<std::string> keep(train_shards.names().begin(), train_shards.names().end());
  keep.insert(val_shards.names().begin(), val_shards.names().end());
  remove_stale_shards(out, keep);

  result.documents = records;
  result.train_packing = train.stats();
  result.val_packing = val.stats();
  result.train_tokens = train.stats().tokens;
  result.val_tokens = val.stats().tokens;
  result.vocab_size = vocab_size;
  for (const std::string& name : train_shards.shards())
    result.train_shards.push_back(staging.final_path(name).string());
  for (const std::string& name : val_shards.shards())
    result.val_shards.push_back(staging.final_path(name).string());
  result.tokenizer_path = fs::absolute(*options.tokenizer).string();
  result.input_files = static_cast<int64_t>(inputs.files.size());
  result.skipped_files = inputs.skipped;

  auto packing = [](const PackingStats& s) {
    return nlohmann::json{{"records", s.records},       {"truncated", s.truncated},
                          {"dropped", s.dropped},       {"windows", s.windows},
                          {"tokens", s.tokens},         {"target_tokens", s.targets},
                          {"padding_tokens", s.padding}};
  };
  const nlohmann::json meta = {
      {"format", "jsonl"},
      {"vocab_size", result.vocab_size},
      {"seq_len", options.seq_len},
      {"overlong", options.overlong},
      {"records", {{"total", records}, {"without_targets", result.records_without_targets}}},
      {"packing", {{"train", packing(result.train_packing)}, {"val", packing(result.val_packing)}}},
      {"tokens", {{"train", result.train_tokens}, {"val", result.val_tokens}}},
      {"tokenizer", result.tokenizer_path},
      {"chat_template",
       result.chat_template.empty() ? nlohmann::json() : nlohmann::json(result.chat_template)},
      {"train_shards", result.train_shards},
      {"val_shards", result.val_shards},
      {"inputs", options.inputs},
      {"val_fraction", options.val_fraction},
      {"seed", options.seed},
  };
  write_json_atomically(out / "meta.json", meta);
  return result;
}

}  // namespace

PrepareDataResult prepare_data(const PrepareDataOptions& options) {
  check_options(options);
  if (options.format == "jsonl") return prepare_jsonl(options);
  if (options.format != "text") {
    throw DataError(fmt::format("--format '{}' is not one of: text, jsonl", options.format));
  }
  const fs::path out(options.out_dir);
  const InputFiles inputs = gather_inputs(options.inputs, fs::weakly_canonical(out));

  int64_t documents = 0;
  for_each_document(inputs, options.separator, [&](int64_t, std::string_view) { ++documents; });
  if (documents == 0) {
    throw DataError(
        fmt::format("the {} input file(s) hold no text\nHINT: check the --input "
                    "paths{}",
                    inputs.files.size(), options.separator ? " and --separator" : ""));
  }
  const DocumentSplit split(options.seed, options.val_fraction, documents);

  std::error_code ec;
  fs::create_directories(out, ec);
  if (ec || !fs::is_directory(out)) {
    throw DataError(
        fmt::format("cannot create output directory {}: {}\nHINT: check the --out "
                    "path and its permissions",
                    out.string(), ec ? ec.message() : "a file of that name exists"));
  }
  Staging staging(out);

  bool stale_vocab_file = false;
  std::string tokenizer_name;
  const fs::path staged_tokenizer =
      stage_tokenizer(options, inputs, split, staging, &stale_vocab_file, &tokenizer_name);
  const fs::path tokenizer_path = staging.final_path(tokenizer_name);
  // A tokenizer.json is read where it came from: its BOS and EOS depend on the
  // tokenizer_config.json beside it (the staged copies are not in place yet).
  const Tokenizer tokenizer(tokenizer_name == "tokenizer.json" && options.tokenizer
                                ? *options.tokenizer
                                : staged_tokenizer.string());
  const int64_t vocab_size = tokenizer.vocab_size();
  // A tokenizer.json without BOS (GPT-2 style) ends every document with its EOS instead.
  const bool eos_separated = tokenizer.is_tokenizer_json() && tokenizer.bos_id() < 0;
  if (tokenizer.bos_id() < 0 && !(eos_separated && tokenizer.eos_id() >= 0)) {
    throw DataError(
        fmt::format("tokenizer {} has no BOS piece (<s>){}, which marks where each "
                    "document starts in the shards\nHINT: use a Llama-style "
                    "tokenizer, or let prepare-data train one (--vocab-size)",
                    options.tokenizer.value_or(tokenizer_path.string()),
                    tokenizer.is_tokenizer_json() ? " and no EOS" : ""));
  }

  // Tokens: every document is BOS + its tokens (the BOS marks document boundaries), or its
  // tokens + EOS for a tokenizer without BOS.
  ShardWriter train(staging, "train", options.shard_tokens, vocab_size);
  ShardWriter val(staging, "val", options.shard_tokens, vocab_size);
  std::vector<int64_t> train_counts(vocab_size, 0);
  std::vector<uint32_t> tokens;
  for_each_document(inputs, options.separator, [&](int64_t i, std::string_view doc) {
    tokens.clear();
    if (!eos_separated) tokens.push_back(static_cast<uint32_t>(tokenizer.bos_id()));
    const std::vector<uint32_t> ids = tokenizer.encode(std::string(doc));
    tokens.insert(tokens.end(), ids.begin(), ids.end());
    if (eos_separated) tokens.push_back(static_cast<uint32_t>(tokenizer.eos_id()));
    if (split.is_val(i)) {
      val.add(tokens);
    } else {
      for (uint32_t t : tokens) ++train_counts[t];
      train.add(tokens);
    }
  });
  train.finish();
  val.finish();

  staging.commit();
  if (stale_vocab_file) fs::remove(staging.final_path("tokenizer.vocab"), ec);
  std::set<std::string> keep(train.names().begin(), train.names().end());
  keep.insert(val.names().begin(), val.names().end());
  remove_stale_shards(out, keep);

  PrepareDataResult result;
  result.documents = documents;
  result.train_tokens = train.tokens();
  result.val_tokens = val.tokens();
  result.vocab_size = vocab_size;
  result.unigram_entropy_nats = unigram_entropy_nats(train_counts);
  for (const std::string& name : train.names()) {
    result.train_shards.push_back(staging.final_path(name).string());
  }
  for (const std::string& name : val.names()) {
    result.val_shards.push_back(staging.final_path(name).string());
  }
  result.tokenizer_path = tokenizer_path.string();
  result.input_files = static_cast<int64_t>(inputs.files.size());
  result.skipped_files = inputs.skipped;

  const nlohmann::json meta = {
      {"vocab_size", result.vocab_size},
      {"documents", {{"train", documents - split.val_documents()}, {"val", split.val_documents()}}},
      {"tokens", {{"train", result.train_tokens}, {"val", result.val_tokens}}},
      {"unigram_entropy_nats", result.unigram_entropy_nats},
      {"tokenizer", result.tokenizer_path},
      {"train_shards", result.train_shards},
      {"val_shards", result.val_shards},
      {"inputs", options.inputs},
      {"files", result.input_files},
      {"files_skipped", result.skipped_files},
      {"separator", options.separator ? nlohmann::json(*options.separator) : nlohmann::json()},
      {"val_fraction", options.val_fraction},
      {"seed", options.seed},
  };
  write_json_atomically(out / "meta.json", meta);
  return result;
}

}  // namespace strata
