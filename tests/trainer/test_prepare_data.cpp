// prepare-data: documents, train/val split, tokenizer training and reuse, shards, errors.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "tests/trainer/temp_dir.h"
#include "trainer/prepare_data.h"
#include "trainer/token_shard.h"
#include "trainer/tokenizer.h"

namespace strata {
namespace {

using testing::TempDir;
namespace fs = std::filesystem;

const char* kFortunes = "/usr/share/games/fortunes/fortunes";

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

TEST(PrepareData, TrainsATokenizerAndWritesShardsThatDecodeToTheText) {
  TempDir dir;
  {
    std::ofstream text(dir / "a.txt");
    text << "The quick brown fox jumps over the lazy dog.\n%\nA second document, with 123 digits.\n%\n";
  }
  PrepareDataOptions options;
  options.inputs = {kFortunes, dir / "a.txt"};
  options.out_dir = dir / "out";
  options.vocab_size = 400;
  options.separator = "%";
  options.val_fraction = 0.1;
  options.shard_tokens = 4000;
  const PrepareDataResult r = prepare_data(options);
  EXPECT_EQ(r.vocab_size, 400);
  EXPECT_GT(r.documents, 100);
  EXPECT_GT(r.train_shards.size(), 1u);  // shard_tokens splits the train tokens
  EXPECT_EQ(r.val_shards.size(), 1u);
  EXPECT_GT(r.val_tokens, 0);
  EXPECT_NEAR(static_cast<double>(r.val_tokens) / (r.val_tokens + r.train_tokens), 0.1, 0.06);
  EXPECT_GT(r.unigram_entropy_nats, 3.0);
  EXPECT_LT(r.unigram_entropy_nats, std::log(400.0));

  // Documents are BOS-delimited and decode back to the text (digits split, bytes kept).
  Tokenizer tokenizer(r.tokenizer_path);
  const std::vector<uint32_t> tokens = all_tokens(r.train_shards);
  EXPECT_EQ(static_cast<int64_t>(tokens.size()), r.train_tokens);
  EXPECT_EQ(tokens.front(), 1u);
  const std::string text = tokenizer.decode(std::vector<int64_t>(tokens.begin(), tokens.end()));
  const bool has_fox = text.find("The quick brown fox jumps over the lazy dog.") != std::string::npos;
  const bool in_val =
      tokenizer.decode([&] {
        auto v = all_tokens(r.val_shards);
        return std::vector<int64_t>(v.begin(), v.end());
      }()).find("quick brown fox") != std::string::npos;
  EXPECT_TRUE(has_fox || in_val);
  EXPECT_EQ(text.find("\n%\n"), std::string::npos) << "separator lines must not be in the text";

  nlohmann::json meta = nlohmann::json::parse(std::ifstream(dir / "out/meta.json"));
  EXPECT_EQ(meta["tokens"]["train"], r.train_tokens);
  EXPECT_EQ(meta["vocab_size"], 400);
  EXPECT_FALSE(fs::exists(dir / "out/.tokenizer_corpus.txt"));
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

  PrepareDataOptions reuse;
  reuse.inputs = {"/usr/share/games/fortunes/goedel"};
  reuse.out_dir = dir / "first";  // same directory: old shards must not survive
  reuse.tokenizer = dir / "first/tokenizer.model";
  const PrepareDataResult second = prepare_data(reuse);
  EXPECT_EQ(second.vocab_size, 400);
  EXPECT_LT(second.train_tokens, first.train_tokens);
  int shards_on_disk = 0;
  for (const auto& entry : fs::directory_iterator(dir / "first")) {
    shards_on_disk += entry.path().extension() == ".bin";
  }
  EXPECT_EQ(shards_on_disk, static_cast<int>(second.train_shards.size() + second.val_shards.size()));
}

TEST(PrepareData, DirectoriesSkipBinariesAndLinks) {
  TempDir dir;
  fs::create_directories(dir / "in/sub");
  {
    std::ofstream(dir / "in/one.txt") << std::ifstream(kFortunes).rdbuf();
    std::ofstream(dir / "in/sub/two.txt") << "Another small text file.\n";
    std::ofstream bin(dir / "in/blob", std::ios::binary);
    bin.write("\0\1\2\3", 4);
    std::ofstream(dir / "in/one.dat") << "index";
  }
  fs::create_symlink(dir / "in/one.txt", dir / "in/one.u8");
  PrepareDataOptions options;
  options.inputs = {dir / "in"};
  options.out_dir = dir / "out";
  options.vocab_size = 400;
  prepare_data(options);
  nlohmann::json meta = nlohmann::json::parse(std::ifstream(dir / "out/meta.json"));
  EXPECT_EQ(meta["files"], 2);
  EXPECT_EQ(meta["files_skipped"], 3);
  EXPECT_EQ(meta["documents"]["train"].get<int>() + meta["documents"]["val"].get<int>(), 2);
}

TEST(PrepareData, BadInputsAreNamed) {
  TempDir dir;
  PrepareDataOptions options;
  options.out_dir = dir / "out";
  options.inputs = {dir / "missing.txt"};
  EXPECT_NE(prepare_error(options).find("input '" + (dir / "missing.txt") + "' is neither a file"),
            std::string::npos);
  options.inputs = {dir / "*.nothing"};
  EXPECT_NE(prepare_error(options).find("matches no text file"), std::string::npos);
  options.inputs = {kFortunes};
  options.val_fraction = 1.5;
  EXPECT_NE(prepare_error(options).find("--val-fraction 1.5 is out of range"), std::string::npos);
  options.val_fraction = 0.05;
  options.vocab_size = 100;
  EXPECT_NE(prepare_error(options).find("--vocab-size 100 is too small"), std::string::npos);
  options.vocab_size = 60000;
  const std::string too_big = prepare_error(options);
  EXPECT_NE(too_big.find("adjust --vocab-size"), std::string::npos) << too_big;
  options.vocab_size = 400;
  options.tokenizer = dir / "none.model";
  EXPECT_NE(prepare_error(options).find("tokenizer " + (dir / "none.model") + " does not exist"),
            std::string::npos);
}

}  // namespace
}  // namespace strata
