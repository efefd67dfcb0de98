// prepare-data: documents, train/val split, tokenizer training and reuse, shards, errors.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <climits>
#include <cstdint>
#include <map>
#include <optional>
#include <nlohmann/json.hpp>
#include <sstream>

#include "tests/common/temp_dir.h"
#include "trainer/data/prepare_data.h"
#include "trainer/data/token_shard.h"
#include "trainer/data/tokenizer.h"

namespace strata {
namespace {

using testing::TempDir;
namespace fs = std::filesystem;

const char* kFortunes = "/usr/share/games/fortunes/fortunes";
const char* kGoedel = "/usr/share/games/fortunes/goedel";

std::string prepare_error(const PrepareDataOptions& options) {
  try {
    prepare_data(options);
  } catch (const DataError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected DataError";
  return "";
}

std::vector<uint32_t> all_tokens(const std::vector<std::string>& shards) {
  std::vector<uint32_t> out;
  for (const auto& path : shards) {
    TokenShard shard(path);
    for (int64_t i = 0; i < shard.size(); ++i) out.push_back(shard.token(i));
  }
  return out;
}

// The documents of BOS-delimited token streams, decoded.
std::vector<std::string> decode_documents(const Tokenizer& tokenizer,
                                          const std::vector<uint32_t>& tokens) {
  std::vector<std::string> documents;
  std::vector<int64_t> current;
  for (size_t i = 0; i <= tokens.size(); ++i) {
    if (i == tokens.size() || static_cast<int>(tokens[i]) == tokenizer.bos_id()) {
      if (i > 0) documents.push_back(tokenizer.decode(current));
      current.clear();
    } else {
      current.push_back(tokens[i]);
    }
  }
  return documents;
}

// English-like text: `count` documents of 1-4 lines, separated by lines "%", with digits, a
// few non-ASCII words, and blank documents that must be dropped. Returns the documents as
// prepare-data should see them.
std::vector<std::string> write_corpus(const std::string& path, int count) {
  const std::vector<std::string> subjects = {"The old sailor", "A quiet engineer", "My neighbour",
                                             "The committee",  "Every student",    "The small dog",
                                             "Our café owner", "The naïve reader"};
  const std::vector<std::string> verbs = {"watched", "repaired", "forgot",  "wrote about",
                                          "counted", "painted",  "ignored", "described"};
  const std::vector<std::string> objects = {
      "the red boat",       "seven lamps",    "a long letter",     "the broken clock",
      "the river at night", "the 42 windows", "a strange machine", "the garden"};
  std::ofstream out(path);
  std::vector<std::string> documents;
  uint64_t state = 12345;
  auto next = [&](size_t n) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<size_t>((state >> 33) % n);
  };
  for (int d = 0; d < count; ++d) {
    std::string document;
    const size_t lines = 1 + next(4);
    for (size_t l = 0; l < lines; ++l) {
      document += subjects[next(subjects.size())] + " " + verbs[next(verbs.size())] + " " +
                  objects[next(objects.size())];
      document += next(3) == 0 ? " in " + std::to_string(1900 + next(120)) + "." : ".";
      document += "\n";
    }
    if (d > 0) out << "%\n";
    out << document;
    documents.push_back(document);
    if (d % 50 == 7) out << "%\n  \n";  // a blank document
  }
  return documents;
}

TEST(PrepareData, ShardsDecodeToTheDocumentsSplitAtTheSeparator) {
  TempDir dir;
  const std::vector<std::string> documents = write_corpus(dir / "corpus.txt", 300);
  PrepareDataOptions options;
  options.inputs = {dir / "corpus.txt"};
  options.out_dir = dir / "out";
  options.vocab_size = 320;
  options.separator = "%";
  options.val_fraction = 0.2;
  options.shard_tokens = 1000;
  const PrepareDataResult r = prepare_data(options);
  EXPECT_EQ(r.documents, 300);
  EXPECT_EQ(r.vocab_size, 320);
  EXPECT_GT(r.train_shards.size(), 1u);  // shard_tokens splits the train tokens

  Tokenizer tokenizer(r.tokenizer_path);
  EXPECT_EQ(tokenizer.bos_id(), 1);
  const std::vector<uint32_t> train_tokens = all_tokens(r.train_shards);
  const std::vector<uint32_t> val_tokens = all_tokens(r.val_shards);
  EXPECT_EQ(static_cast<int64_t>(train_tokens.size()), r.train_tokens);
  EXPECT_EQ(static_cast<int64_t>(val_tokens.size()), r.val_tokens);
  EXPECT_EQ(train_tokens.front(), 1u);
  EXPECT_EQ(val_tokens.front(), 1u);
  const std::vector<std::string> train = decode_documents(tokenizer, train_tokens);
  const std::vector<std::string> val = decode_documents(tokenizer, val_tokens);
  EXPECT_EQ(static_cast<int64_t>(train.size() + val.size()), r.documents);
  EXPECT_NEAR(static_cast<double>(val.size()) / r.documents, 0.2, 0.07);

  // Each side keeps the input order; together they are the input documents, byte for byte.
  size_t t = 0, v = 0;
  for (const std::string& document : documents) {
    if (t < train.size() && train[t] == document) {
      ++t;
    } else if (v < val.size() && val[v] == document) {
      ++v;
    } else {
      ADD_FAILURE() << "document not found in order: " << document << "train[" << t
                    << "]: " << (t < train.size() ? train[t] : "") << "val[" << v
                    << "]: " << (v < val.size() ? val[v] : "");
      break;
    }
  }

  nlohmann::json meta = nlohmann::json::parse(std::ifstream(dir / "out/meta.json"));
  EXPECT_EQ(meta["tokens"]["train"], r.train_tokens);
  EXPECT_EQ(meta["tokens"]["val"], r.val_tokens);
  EXPECT_EQ(meta["documents"]["train"], train.size());
  EXPECT_EQ(meta["documents"]["val"], val.size());
  EXPECT_EQ(meta["vocab_size"], 320);
  EXPECT_EQ(meta["train_shards"].size(), r.train_shards.size());
  EXPECT_DOUBLE_EQ(meta["unigram_entropy_nats"].get<double>(), r.unigram_entropy_nats);
  EXPECT_GT(r.unigram_entropy_nats, 2.0);
  EXPECT_LT(r.unigram_entropy_nats, std::log(320.0));
  for (const auto& entry : fs::directory_iterator(dir / "out")) {
    EXPECT_NE(entry.path().filename().string().front(), '.') << entry.path();  // no leftovers
  }
}

TEST(PrepareData, UnigramEntropyMatchesTheTrainTokens) {
  TempDir dir;
  write_corpus(dir / "corpus.txt", 120);
  PrepareDataOptions options;
  options.inputs = {dir / "corpus.txt"};
  options.out_dir = dir / "out";
  options.vocab_size = 320;
  options.separator = "%";
  const PrepareDataResult r = prepare_data(options);
  std::map<uint32_t, double> counts;
  const std::vector<uint32_t> tokens = all_tokens(r.train_shards);
  for (uint32_t token : tokens) ++counts[token];
  double entropy = 0;
  for (const auto& [token, count] : counts) {
    entropy -= count / tokens.size() * std::log(count / tokens.size());
  }
  EXPECT_NEAR(r.unigram_entropy_nats, entropy, 1e-9);
}

TEST(PrepareData, EachFileIsADocumentAndBothSidesGetOne) {
  TempDir dir;
  fs::create_directories(dir / "in");
  std::ofstream(dir / "in/a.txt") << "First file.\n%\nStill the first file: no separator given.\n";
  std::ofstream(dir / "in/b.txt") << "Second file.\n";
  std::ofstream(dir / "in/c.txt") << " \n\n";  // blank: dropped
  PrepareDataOptions options;
  options.inputs = {dir / "in"};
  options.out_dir = dir / "out";
  options.tokenizer = dir / "tokenizer.model";
  options.val_fraction = 0.01;  // the hash picks no document: one is moved to val anyway
  {
    PrepareDataOptions train = options;
    train.tokenizer.reset();
    train.inputs = {kFortunes};
    train.out_dir = dir.path().string();
    train.vocab_size = 400;
    train.separator = "%";
    prepare_data(train);
  }
  const PrepareDataResult r = prepare_data(options);
  EXPECT_EQ(r.documents, 2);
  EXPECT_EQ(r.input_files, 3);
  ASSERT_EQ(r.val_shards.size(), 1u);
  Tokenizer tokenizer(r.tokenizer_path);
  const auto train = decode_documents(tokenizer, all_tokens(r.train_shards));
  const auto val = decode_documents(tokenizer, all_tokens(r.val_shards));
  ASSERT_EQ(train.size(), 1u);
  ASSERT_EQ(val.size(), 1u);
  EXPECT_EQ(train[0], "First file.\n%\nStill the first file: no separator given.\n");
  EXPECT_EQ(val[0], "Second file.\n");

  options.val_fraction = 0.0;
  const PrepareDataResult no_val = prepare_data(options);
  EXPECT_TRUE(no_val.val_shards.empty());
  EXPECT_EQ(no_val.val_tokens, 0);
  EXPECT_FALSE(fs::exists(dir / "out/val_000000.bin"));  // the earlier run's is gone
}

TEST(PrepareData, ReusesAGivenTokenizerAndReplacesOldShards) {
  TempDir dir;
  PrepareDataOptions options;
  options.inputs = {kFortunes};
  options.out_dir = dir / "first";
  options.vocab_size = 400;
  options.separator = "%";
  options.shard_tokens = 2000;
  const PrepareDataResult first = prepare_data(options);
  EXPECT_GT(first.train_shards.size(), 3u);

  PrepareDataOptions elsewhere;
  elsewhere.inputs = {kGoedel};
  elsewhere.out_dir = dir / "second";
  elsewhere.tokenizer = dir / "first/tokenizer.model";
  const PrepareDataResult copied = prepare_data(elsewhere);
  EXPECT_EQ(copied.vocab_size, 400);
  EXPECT_EQ(copied.tokenizer_path, dir / "second/tokenizer.model");
  std::ifstream a(dir / "first/tokenizer.model"), b(dir / "second/tokenizer.model");
  std::stringstream a_bytes, b_bytes;
  a_bytes << a.rdbuf();
  b_bytes << b.rdbuf();
  EXPECT_EQ(a_bytes.str(), b_bytes.str());

  PrepareDataOptions reuse = elsewhere;
  reuse.out_dir = dir / "first";  // same directory, same tokenizer: old shards must not survive
  const PrepareDataResult second = prepare_data(reuse);
  EXPECT_EQ(second.vocab_size, 400);
  EXPECT_LT(second.train_tokens, first.train_tokens);
  int shards_on_disk = 0;
  for (const auto& entry : fs::directory_iterator(dir / "first")) {
    shards_on_disk += entry.path().extension() == ".bin";
  }
  EXPECT_EQ(shards_on_disk,
            static_cast<int>(second.train_shards.size() + second.val_shards.size()));
}

TEST(PrepareData, AFailedRunLeavesTheEarlierOutputAlone) {
  TempDir dir;
  PrepareDataOptions options;
  options.inputs = {kFortunes};
  options.out_dir = dir / "out";
  options.vocab_size = 400;
  options.separator = "%";
  prepare_data(options);
  const auto before = fs::file_size(dir / "out/train_000000.bin");
  const auto meta_before = fs::last_write_time(dir / "out/meta.json");

  options.inputs = {kGoedel};
  options.vocab_size = 30000;  // too large for the text: SentencePiece fails
  EXPECT_NE(prepare_error(options).find("lower --vocab-size"), std::string::npos);
  EXPECT_EQ(fs::file_size(dir / "out/train_000000.bin"), before);
  EXPECT_EQ(fs::last_write_time(dir / "out/meta.json"), meta_before);
  Tokenizer tokenizer(dir / "out/tokenizer.model");
  EXPECT_EQ(tokenizer.vocab_size(), 400);
  for (const auto& entry : fs::directory_iterator(dir / "out")) {
    EXPECT_NE(entry.path().filename().string().front(), '.') << entry.path();
  }
}

TEST(PrepareData, DirectoriesAndPatternsSkipBinariesDatHiddenAndDuplicates) {
  TempDir dir;
  fs::create_directories(dir / "in/sub");
  fs::create_directories(dir / "in/.git");
  {
    std::ofstream(dir / "in/one.txt") << std::ifstream(kFortunes).rdbuf();
    std::ofstream(dir / "in/sub/two.txt") << "Another small text file.\n";
    std::ofstream bin(dir / "in/blob", std::ios::binary);
    bin.write("\0\1\2\3", 4);
    std::ofstream(dir / "in/one.dat") << "index";
    std::ofstream(dir / "in/.notes") << "hidden";
    std::ofstream(dir / "in/.git/HEAD") << "ref: refs/heads/main\n";
  }
  fs::create_symlink(dir / "in/one.txt", dir / "in/one.u8");       // the same file again
  fs::create_symlink(dir / "in/gone.txt", dir / "in/sub/broken");  // ignored
  PrepareDataOptions options;
  options.inputs = {dir / "in"};
  options.out_dir = dir / "in/out";  // inside the input: never read back
  options.vocab_size = 400;
  const PrepareDataResult first = prepare_data(options);
  EXPECT_EQ(first.input_files, 2);
  EXPECT_EQ(first.skipped_files, 4);  // blob, one.dat, .notes, one.u8
  EXPECT_EQ(first.documents, 2);
  nlohmann::json meta = nlohmann::json::parse(std::ifstream(dir / "in/out/meta.json"));
  EXPECT_EQ(meta["files"], 2);
  EXPECT_EQ(meta["files_skipped"], 4);
  const PrepareDataResult again = prepare_data(options);  // out/ now holds text files
  EXPECT_EQ(again.input_files, 2);
  options.inputs = {dir / "in/*"};
  EXPECT_EQ(prepare_data(options).input_files, 2);

  options.inputs = {dir / "in/*.txt", dir / "in/s*", dir / "in/one.txt"};
  options.out_dir = dir / "out2";
  const PrepareDataResult globbed = prepare_data(options);
  EXPECT_EQ(globbed.input_files, 2);
  EXPECT_EQ(globbed.skipped_files, 1);  // one.txt named twice
}

TEST(PrepareData, RejectsATokenizerWithoutBos) {
  TempDir dir;
  const std::string command = "spm_train --input=" + std::string(kFortunes) +
                              " --model_prefix=" + (dir / "nobos") +
                              " --vocab_size=300 --bos_id=-1 --minloglevel=2 >/dev/null 2>&1";
  if (std::system(command.c_str()) != 0) GTEST_SKIP() << "spm_train (package sentencepiece) absent";
  PrepareDataOptions options;
  options.inputs = {kGoedel};
  options.out_dir = dir / "out";
  options.tokenizer = dir / "nobos.model";
  EXPECT_NE(prepare_error(options).find("has no BOS piece"), std::string::npos);
  EXPECT_FALSE(fs::exists(dir / "out/tokenizer.model"));
}

// The `tokenizers` BPE of a tokenizer.json (the algorithm of its BPE model): the dummy prefix,
// spaces as U+2581, characters outside the vocabulary as byte pieces, then the lowest-ranked
// adjacent pair merged first (leftmost on ties), BOS in front.
std::vector<uint32_t> hf_bpe_encode(const nlohmann::json& tj, const std::string& text) {
  const nlohmann::json& vocab = tj.at("model").at("vocab");
  std::map<std::pair<std::string, std::string>, size_t> rank;
  const auto& merges = tj.at("model").at("merges");
  for (size_t i = 0; i < merges.size(); ++i) {
    const std::string m = merges[i].get<std::string>();
    rank[{m.substr(0, m.find(' ')), m.substr(m.find(' ') + 1)}] = i;
  }
  std::string escaped = "\u2581";
  for (char c : text) escaped += c == ' ' ? std::string("\u2581") : std::string(1, c);
  std::vector<std::string> word;
  for (size_t i = 0; i < escaped.size();) {
    size_t n = 1;
    while (i + n < escaped.size() && (static_cast<uint8_t>(escaped[i + n]) & 0xC0) == 0x80) ++n;
    const std::string ch = escaped.substr(i, n);
    if (vocab.contains(ch)) {
      word.push_back(ch);
    } else {
      for (char b : ch) word.push_back(fmt::format("<0x{:02X}>", static_cast<uint8_t>(b)));
    }
    i += n;
  }
  for (;;) {
    size_t best = SIZE_MAX, at = 0;
    for (size_t i = 0; i + 1 < word.size(); ++i) {
      const auto r = rank.find({word[i], word[i + 1]});
      if (r != rank.end() && r->second < best) best = r->second, at = i;
    }
    if (best == SIZE_MAX) break;
    word[at] += word[at + 1];
    word.erase(word.begin() + static_cast<std::ptrdiff_t>(at) + 1);
  }
  std::vector<uint32_t> ids = {1};
  for (const std::string& piece : word) ids.push_back(vocab.at(piece).get<uint32_t>());
  return ids;
}

// transformers loads an export's tokenizer.json without SentencePiece; it must encode every
// text to the ids SentencePiece gives (leading spaces, repeated spaces, control pieces as text,
// bytes outside the vocabulary).
TEST(PrepareData, TokenizerJsonEncodesAsTheTokenizer) {
  TempDir dir;
  PrepareDataOptions options;
  options.inputs = {kFortunes};
  options.separator = "%";
  options.out_dir = dir / "out";
  options.vocab_size = 500;
  const PrepareDataResult r = prepare_data(options);
  const Tokenizer tokenizer(r.tokenizer_path);
  const std::optional<std::string> text = tokenizer.hf_tokenizer_json();
  ASSERT_TRUE(text.has_value());
  const nlohmann::json tj = nlohmann::json::parse(*text);
  EXPECT_EQ(tj["model"]["vocab"].size(), 500u);
  EXPECT_EQ(tj["model"]["vocab"]["<s>"], 1);
  EXPECT_EQ(tj["added_tokens"].size(), 3u);  // <unk>, <s>, </s>
  std::vector<std::string> texts = {"Hello world",
                                    "  two  spaces\nnew line\n\n",
                                    " a leading space",
                                    "trailing ",
                                    "\ttab",
                                    "digits 1234567890",
                                    "ünïcödé 日本語 🤖",
                                    "<s> and </s> as text",
                                    "x"};
  std::ifstream in(kFortunes);
  std::string doc, line;
  while (std::getline(in, line) && texts.size() < 200) {
    if (line == "%") {
      texts.push_back(doc);
      doc.clear();
    } else {
      doc += line + "\n";
    }
  }
  int differ = 0;
  for (const std::string& t : texts) {
    std::vector<uint32_t> expected = {1};
    for (uint32_t id : tokenizer.encode(t)) expected.push_back(id);
    if (hf_bpe_encode(tj, t) != expected && ++differ <= 3)
      ADD_FAILURE() << "tokenizer.json encodes differently: " << t;
  }
  EXPECT_EQ(differ, 0) << "of " << texts.size() << " texts";

  // A model this form cannot reproduce (unigram) gets none.
  const std::string command =
      "spm_train --input=" + std::string(kFortunes) + " --model_prefix=" + (dir / "uni") +
      " --vocab_size=300 --model_type=unigram --minloglevel=2 >/dev/null 2>&1";
  if (std::system(command.c_str()) != 0) GTEST_SKIP() << "spm_train (package sentencepiece) absent";
  EXPECT_FALSE(Tokenizer(dir / "uni.model").hf_tokenizer_json().has_value());
}

TEST(PrepareData, BadInputsAreNamed) {
  TempDir dir;
  PrepareDataOptions options;
  options.out_dir = dir / "out";
  options.inputs = {kFortunes, dir / "missing.txt"};
  EXPECT_NE(prepare_error(options).find("input " + (dir / "missing.txt") + " does not exist"),
            std::string::npos);
  options.inputs = {dir / "*.nothing"};
  EXPECT_NE(
      prepare_error(options).find("input pattern '" + (dir / "*.nothing") + "' matches nothing"),
      std::string::npos);
  fs::create_directories(dir / "bin");
  std::ofstream(dir / "bin/x.dat") << "not text";
  options.inputs = {dir / "bin"};
  EXPECT_NE(prepare_error(options).find("holds no text files (1 skipped"), std::string::npos);
  options.inputs = {dir / "bin/*"};
  EXPECT_NE(prepare_error(options).find("matches no text file (1 skipped"), std::string::npos);
  options.inputs = {"/usr/share/games/fortunes/fortunes.dat"};
  EXPECT_NE(prepare_error(options).find("is not a text file"), std::string::npos);
  options.inputs = {kFortunes};
  options.val_fraction = 1.5;
  EXPECT_NE(prepare_error(options).find("--val-fraction 1.5 is out of range"), std::string::npos);
  options.val_fraction = -0.1;
  EXPECT_NE(prepare_error(options).find("out of range"), std::string::npos);
  options.val_fraction = 0.05;
  options.vocab_size = 100;
  EXPECT_NE(prepare_error(options).find("--vocab-size 100 is too small"), std::string::npos);
  options.vocab_size = 60000;
  const std::string too_big = prepare_error(options);
  EXPECT_NE(too_big.find("the text is too small for 60000 pieces (it supports at most "),
            std::string::npos)
      << too_big;
  EXPECT_NE(too_big.find("HINT: lower --vocab-size to at most "), std::string::npos) << too_big;
  options.vocab_size = 262;
  const std::string too_small = prepare_error(options);
  EXPECT_NE(too_small.find("raise --vocab-size to at least"), std::string::npos) << too_small;
  EXPECT_FALSE(fs::exists(dir / "out/tokenizer.model"));
  options.vocab_size = 400;
  options.tokenizer = dir / "none.model";
  EXPECT_NE(prepare_error(options).find("tokenizer " + (dir / "none.model") + " does not exist"),
            std::string::npos);
  options.tokenizer = kFortunes;
  EXPECT_NE(prepare_error(options).find("cannot load tokenizer " + std::string(kFortunes) +
                                        ": not a SentencePiece model"),
            std::string::npos);
}

}  // namespace
}  // namespace strata
