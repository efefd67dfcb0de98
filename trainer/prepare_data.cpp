// `strata prepare-data`: gather text, split documents into train/val, train or reuse a
// tokenizer, write token shards and meta.json.
#include "trainer/prepare_data.h"

#include <fmt/format.h>
#include <glob.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>

#include "trainer/seed.h"
#include "trainer/token_shard.h"
#include "trainer/tokenizer.h"

namespace strata {
namespace {

namespace fs = std::filesystem;

bool looks_binary(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  char buffer[8192];
  in.read(buffer, sizeof(buffer));
  return std::find(buffer, buffer + in.gcount(), '\0') != buffer + in.gcount();
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw DataError(fmt::format("cannot read input {}", path.string()));
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

struct InputFiles {
  std::vector<fs::path> files;
  int64_t skipped = 0;  // binary, .dat, or links to files already listed
};

// Files, directories (recursed; regular text files only) and glob patterns, in input order,
// each file once.
InputFiles gather_inputs(const std::vector<std::string>& inputs) {
  InputFiles out;
  std::set<fs::path> seen;
  auto add = [&](const fs::path& path) {
    if (seen.insert(fs::weakly_canonical(path)).second) {
      out.files.push_back(path);
    } else {
      ++out.skipped;
    }
  };
  for (const std::string& input : inputs) {
    std::error_code ec;
    if (fs::is_directory(input, ec)) {
      std::vector<fs::path> found;
      for (const auto& entry : fs::recursive_directory_iterator(input)) {
        if (!entry.is_regular_file()) continue;
        if (entry.is_symlink() || entry.path().extension() == ".dat" ||
            looks_binary(entry.path())) {
          ++out.skipped;
          continue;
        }
        found.push_back(entry.path());
      }
      std::sort(found.begin(), found.end());
      for (const fs::path& p : found) add(p);
      continue;
    }
    if (fs::is_regular_file(input, ec)) {
      if (looks_binary(input)) {
        throw DataError(fmt::format("input {} is not a text file (it contains NUL bytes)\nHINT: "
                                    "pass text files, directories or glob patterns",
                                    input));
      }
      add(input);
      continue;
    }
    glob_t matches{};
    std::vector<fs::path> found;
    if (glob(input.c_str(), 0, nullptr, &matches) == 0) {
      for (size_t i = 0; i < matches.gl_pathc; ++i) {
        if (fs::is_regular_file(matches.gl_pathv[i]) && !looks_binary(matches.gl_pathv[i])) {
          found.emplace_back(matches.gl_pathv[i]);
        }
      }
    }
    globfree(&matches);
    if (found.empty()) {
      throw DataError(fmt::format("input '{}' is neither a file nor a directory, and matches no "
                                  "text file as a glob pattern\nHINT: check the path",
                                  input));
    }
    for (const fs::path& p : found) add(p);
  }
  return out;
}

// Splits `text` at lines equal to `separator` (when given); drops blank documents.
std::vector<std::string> split_documents(const std::string& text,
                                         const std::optional<std::string>& separator) {
  std::vector<std::string> documents;
  auto keep = [&](std::string doc) {
    if (doc.find_first_not_of(" \t\r\n") != std::string::npos) documents.push_back(std::move(doc));
  };
  if (!separator) {
    keep(text);
    return documents;
  }
  std::string current;
  size_t begin = 0;
  while (begin < text.size()) {
    size_t end = text.find('\n', begin);
    const size_t line_end = end == std::string::npos ? text.size() : end;
    const std::string line = text.substr(begin, line_end - begin);
    if (line == *separator || (!line.empty() && line.back() == '\r' &&
                               line.substr(0, line.size() - 1) == *separator)) {
      keep(std::move(current));
      current.clear();
    } else {
      current.append(text, begin, (end == std::string::npos ? text.size() : end + 1) - begin);
    }
    begin = end == std::string::npos ? text.size() : end + 1;
  }
  keep(std::move(current));
  return documents;
}

// Writes `tokens` as shards `<prefix>_NNNNNN.bin` of at most `shard_tokens` each.
std::vector<std::string> write_shards(const fs::path& dir, const std::string& prefix,
                                      const std::vector<uint32_t>& tokens, int64_t shard_tokens,
                                      int64_t vocab_size) {
  std::vector<std::string> paths;
  for (size_t begin = 0, index = 0; begin < tokens.size() || index == 0; ++index) {
    const size_t end = std::min(tokens.size(), begin + static_cast<size_t>(shard_tokens));
    const std::string path = (dir / fmt::format("{}_{:06d}.bin", prefix, index)).string();
    write_token_shard(path, std::vector<uint32_t>(tokens.begin() + begin, tokens.begin() + end),
                      vocab_size);
    paths.push_back(path);
    begin = end;
  }
  return paths;
}

void write_json_atomically(const fs::path& path, const nlohmann::json& value) {
  const fs::path temp = path.string() + ".tmp";
  {
    std::ofstream out(temp, std::ios::trunc);
    out << value.dump(2) << '\n';
    if (!out) throw DataError(fmt::format("cannot write {}", temp.string()));
  }
  fs::rename(temp, path);
}

}  // namespace

PrepareDataResult prepare_data(const PrepareDataOptions& options) {
  if (!(options.val_fraction >= 0.0 && options.val_fraction < 1.0)) {
    throw DataError(fmt::format("--val-fraction {} is out of range\nHINT: use a value in [0, 1), "
                                "e.g. 0.05",
                                options.val_fraction));
  }
  if (options.shard_tokens <= 0) {
    throw DataError(fmt::format("--shard-tokens {} must be positive", options.shard_tokens));
  }
  if (!options.tokenizer && options.vocab_size < 260) {
    throw DataError(fmt::format("--vocab-size {} is too small: a byte-fallback tokenizer needs "
                                "256 byte pieces and 3 special pieces\nHINT: use at least 260",
                                options.vocab_size));
  }
  const InputFiles inputs = gather_inputs(options.inputs);

  // Documents, and their train/val split by a hash of (seed, document index).
  std::vector<std::string> documents;
  for (const fs::path& file : inputs.files) {
    for (std::string& doc : split_documents(read_file(file), options.separator)) {
      documents.push_back(std::move(doc));
    }
  }
  if (documents.empty()) {
    throw DataError("the inputs hold no text\nHINT: check the --input paths");
  }
  std::vector<bool> is_val(documents.size());
  int64_t val_docs = 0;
  for (size_t i = 0; i < documents.size(); ++i) {
    const double u = static_cast<double>(splitmix64(splitmix64(options.seed) ^ i) >> 11) * 0x1.0p-53;
    is_val[i] = u < options.val_fraction;
    val_docs += is_val[i];
  }
  if (options.val_fraction > 0 && val_docs == 0 && documents.size() >= 2) {
    is_val.back() = true;
    ++val_docs;
  }
  if (val_docs == static_cast<int64_t>(documents.size())) {
    is_val.front() = false;
    --val_docs;
  }

  fs::create_directories(options.out_dir);
  const fs::path out(options.out_dir);
  // Shards of an earlier run in the same directory would be picked up by train_*.bin globs.
  const std::regex shard_name(R"((train|val)_\d{6}\.bin)");
  for (const auto& entry : fs::directory_iterator(out)) {
    if (std::regex_match(entry.path().filename().string(), shard_name)) fs::remove(entry.path());
  }

  // Tokenizer: reuse, or train on the train documents.
  const fs::path tokenizer_path = out / "tokenizer.model";
  if (options.tokenizer) {
    Tokenizer check(*options.tokenizer);  // fails early with a clear message
    if (!fs::exists(tokenizer_path) || !fs::equivalent(*options.tokenizer, tokenizer_path)) {
      fs::copy_file(*options.tokenizer, tokenizer_path, fs::copy_options::overwrite_existing);
    }
  } else {
    const fs::path corpus = out / ".tokenizer_corpus.txt";
    {
      std::ofstream text(corpus, std::ios::trunc);
      for (size_t i = 0; i < documents.size(); ++i) {
        if (!is_val[i]) text << documents[i] << '\n';
      }
      if (!text) throw DataError(fmt::format("cannot write {}", corpus.string()));
    }
    try {
      train_tokenizer(corpus.string(), (out / "tokenizer").string(), options.vocab_size);
    } catch (...) {
      fs::remove(corpus);
      throw;
    }
    fs::remove(corpus);
  }
  const Tokenizer tokenizer(tokenizer_path.string());

  // Tokens: every document is BOS + its tokens (the BOS marks document boundaries).
  std::vector<uint32_t> train_tokens, val_tokens;
  for (size_t i = 0; i < documents.size(); ++i) {
    std::vector<uint32_t>& dest = is_val[i] ? val_tokens : train_tokens;
    dest.push_back(static_cast<uint32_t>(tokenizer.bos_id()));
    const std::vector<uint32_t> ids = tokenizer.encode(documents[i]);
    dest.insert(dest.end(), ids.begin(), ids.end());
  }

  PrepareDataResult result;
  result.documents = static_cast<int64_t>(documents.size());
  result.train_tokens = static_cast<int64_t>(train_tokens.size());
  result.val_tokens = static_cast<int64_t>(val_tokens.size());
  result.vocab_size = tokenizer.vocab_size();
  result.tokenizer_path = tokenizer_path.string();
  std::vector<int64_t> counts(result.vocab_size, 0);
  for (uint32_t t : train_tokens) ++counts[t];
  for (int64_t c : counts) {
    if (c == 0) continue;
    const double p = static_cast<double>(c) / static_cast<double>(train_tokens.size());
    result.unigram_entropy_nats -= p * std::log(p);
  }
  result.train_shards =
      write_shards(out, "train", train_tokens, options.shard_tokens, result.vocab_size);
  if (!val_tokens.empty()) {
    result.val_shards =
        write_shards(out, "val", val_tokens, options.shard_tokens, result.vocab_size);
  }

  nlohmann::json meta = {
      {"vocab_size", result.vocab_size},
      {"documents", {{"train", result.documents - val_docs}, {"val", val_docs}}},
      {"tokens", {{"train", result.train_tokens}, {"val", result.val_tokens}}},
      {"unigram_entropy_nats", result.unigram_entropy_nats},
      {"tokenizer", result.tokenizer_path},
      {"train_shards", result.train_shards},
      {"val_shards", result.val_shards},
      {"inputs", options.inputs},
      {"files", inputs.files.size()},
      {"files_skipped", inputs.skipped},
      {"separator", options.separator ? nlohmann::json(*options.separator) : nlohmann::json()},
      {"val_fraction", options.val_fraction},
      {"seed", options.seed},
  };
  write_json_atomically(out / "meta.json", meta);
  return result;
}

}  // namespace strata
