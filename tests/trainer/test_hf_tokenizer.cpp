// The tokenizer.json tokenizer on hand-written files: ids computed by hand, malformed files and
// unsupported components refused with messages naming them. (tests/hf_clients/
// tokenizer_parity.py compares trained tokenizers with the `tokenizers` library itself.)
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "trainer/data/hf_tokenizer.h"
#include "trainer/data/prepare_data.h"
#include "trainer/data/tokenizer.h"
#include "trainer/errors.h"

namespace strata {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

class HfTokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("strata-hf-tokenizer-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string write(const std::string& name, const std::string& text) {
    const fs::path path = dir_ / name;
    std::ofstream(path, std::ios::binary) << text;
    return path.string();
  }

  // A byte-level BPE over "a", "b", "c", "Ġ" (space) with merges a+b, ab+c, Ġ+ab.
  static json tiny() {
    return json::parse(R"({
      "version": "1.0", "truncation": null, "padding": null,
      "added_tokens": [
        {"id": 8, "content": "<|bos|>", "single_word": false, "lstrip": false, "rstrip": false,
         "normalized": false, "special": true},
        {"id": 9, "content": "<|eos|>", "single_word": false, "lstrip": false, "rstrip": false,
         "normalized": false, "special": true}],
      "normalizer": null,
      "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                        "use_regex": true},
      "post_processor": {"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|bos|>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [],
        "special_tokens": {"<|bos|>": {"id": "<|bos|>", "ids": [8], "tokens": ["<|bos|>"]}}},
      "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                  "use_regex": true},
      "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": {"a": 0, "b": 1, "c": 2, "Ġ": 3, "ab": 4, "abc": 5, "Ġab": 6, "!": 7},
                "merges": [["a", "b"], ["ab", "c"], ["Ġ", "ab"]]}
    })");
  }

  fs::path dir_;
};

TEST_F(HfTokenizerTest, EncodesWithHandComputedIds) {
  const std::string path = write("tokenizer.json", tiny().dump());
  const HfTokenizer tok(path);
  // "abc ab!": words "abc", " ab", "!" -> abc=5, Ġab=6, !=7.
  EXPECT_EQ(tok.encode("abc ab!", false), (std::vector<uint32_t>{5, 6, 7}));
  EXPECT_EQ(tok.encode("abc ab!", true), (std::vector<uint32_t>{8, 5, 6, 7}));
  // "ba": no merge; "abab": one word, a+b twice then no ab+ab merge.
  EXPECT_EQ(tok.encode("ba", false), (std::vector<uint32_t>{1, 0}));
  EXPECT_EQ(tok.encode("abab", false), (std::vector<uint32_t>{4, 4}));
  // Added tokens split the text first; "c" before "<|eos|>" stays alone.
  EXPECT_EQ(tok.encode("c<|eos|>ab", false), (std::vector<uint32_t>{2, 9, 4}));
  EXPECT_EQ(tok.encode("", true), (std::vector<uint32_t>{8}));
  // A character outside the vocabulary (no unk, no byte fallback) is dropped, as tokenizers
  // does, and its neighbours merge.
  EXPECT_EQ(tok.encode("aXb", false), (std::vector<uint32_t>{4}));
  EXPECT_EQ(tok.decode({8, 5, 6, 7, 9}), "<|bos|>abc ab!<|eos|>");
  EXPECT_EQ(tok.decode({1000, 5}), "abc");  // unknown ids are skipped
  EXPECT_EQ(tok.vocab_size(), 10);
  EXPECT_EQ(tok.token_to_id("Ġab"), 6);
  EXPECT_EQ(tok.id_to_token(9), "<|eos|>");
  EXPECT_FALSE(tok.token_to_id("zzz").has_value());
}

TEST_F(HfTokenizerTest, LegacyMergesAndIgnoreMerges) {
  json j = tiny();
  j["model"]["merges"] = {"a b", "ab c", "Ġ ab"};
  const HfTokenizer legacy(write("legacy.json", j.dump()));
  EXPECT_EQ(legacy.encode("abc ab", false), (std::vector<uint32_t>{5, 6}));
  // ignore_merges: a word in the vocabulary is one token even without the merges to build it.
  j["model"]["ignore_merges"] = true;
  j["model"]["merges"] = json::array();
  const HfTokenizer ignore(write("ignore.json", j.dump()));
  EXPECT_EQ(ignore.encode("abc", false), (std::vector<uint32_t>{5}));
  EXPECT_EQ(ignore.encode("cab", false), (std::vector<uint32_t>{2, 0, 1}));
}

TEST_F(HfTokenizerTest, ByteFallbackAndMetaspace) {
  json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}, {"▁", 3},
                {"h", 4},     {"i", 5},   {"▁h", 6},   {"▁hi", 7}};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    vocab[name] = 8 + b;
  }
  json j = tiny();
  j["added_tokens"] = json::array();
  j["post_processor"] = nullptr;
  j["pre_tokenizer"] = {
      {"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "always"}, {"split", true}};
  j["decoder"] = {{"type", "Sequence"},
                  {"decoders",
                   {{{"type", "ByteFallback"}},
                    {{"type", "Fuse"}},
                    {{"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "always"}}}}};
  j["model"] = {{"type", "BPE"},
                {"unk_token", "<unk>"},
                {"byte_fallback", true},
                {"vocab", vocab},
                {"merges", {"▁ h", "▁h i"}}};
  const HfTokenizer tok(write("meta.json", j.dump()));
  // "hi é": "▁hi" then "▁" + é as bytes C3 A9 (8 + 0xC3, 8 + 0xA9).
  EXPECT_EQ(tok.encode("hi é", false), (std::vector<uint32_t>{7, 3, 8 + 0xC3, 8 + 0xA9}));
  // tokenizers' Metaspace decoder drops every "▁" of the first token: after Fuse, all of them.
  EXPECT_EQ(tok.decode({7, 3, 8 + 0xC3, 8 + 0xA9}), "hié");
  // A lone continuation byte decodes to one U+FFFD per byte token.
  EXPECT_EQ(tok.decode({7, 8 + 0xA9, 8 + 0xA9}), "hi\xEF\xBF\xBD\xEF\xBF\xBD");
  // Invalid UTF-8 input: encoded as its replacement character (bytes EF BF BD).
  EXPECT_EQ(tok.encode("\xff", false), (std::vector<uint32_t>{3, 8 + 0xEF, 8 + 0xBF, 8 + 0xBD}));
}

TEST_F(HfTokenizerTest, FacadeFindsTheFileAndSpecialTokens) {
  write("tokenizer.json", tiny().dump());
  const Tokenizer from_dir(dir_.string());
  EXPECT_TRUE(from_dir.is_tokenizer_json());
  EXPECT_EQ(from_dir.path(), (dir_ / "tokenizer.json").string());
  EXPECT_EQ(from_dir.bos_id(), 8);  // the template's special token
  EXPECT_EQ(from_dir.eos_id(), -1);
  EXPECT_EQ(from_dir.encode("ab"), (std::vector<uint32_t>{4}));
  EXPECT_EQ(from_dir.encode("ab", true), (std::vector<uint32_t>{8, 4}));
  // tokenizer_config.json decides: an AddedToken object and a plain string.
  write("tokenizer_config.json",
        R"({"bos_token": {"content": "<|eos|>", "special": true}, "eos_token": "<|eos|>"})");
  const Tokenizer configured((dir_ / "tokenizer.json").string());
  EXPECT_EQ(configured.bos_id(), 9);
  EXPECT_EQ(configured.eos_id(), 9);
  // A key it lacks falls back to the template; null means none.
  write("tokenizer_config.json", R"({"eos_token": "<|eos|>"})");
  EXPECT_EQ(Tokenizer(dir_.string()).bos_id(), 8);
  EXPECT_EQ(Tokenizer(dir_.string()).eos_id(), 9);
  write("tokenizer_config.json", R"({"bos_token": null})");
  EXPECT_EQ(Tokenizer(dir_.string()).bos_id(), -1);
  write("tokenizer_config.json", R"({"bos_token": null, "eos_token": "<|missing|>"})");
  EXPECT_THROW(Tokenizer(dir_.string()), DataError);
}

// The uint16 tokens of an llm.c shard.
std::vector<uint32_t> shard_tokens(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<int32_t> header(256);
  in.read(reinterpret_cast<char*>(header.data()), 1024);
  std::vector<uint16_t> tokens(static_cast<size_t>(header[2]));
  in.read(reinterpret_cast<char*>(tokens.data()), static_cast<std::streamsize>(tokens.size() * 2));
  return std::vector<uint32_t>(tokens.begin(), tokens.end());
}

TEST_F(HfTokenizerTest, PrepareDataUsesTheTokenizerJson) {
  fs::create_directories(dir_ / "model");
  write("model/tokenizer.json", tiny().dump());
  write("model/tokenizer_config.json", R"({"eos_token": "<|eos|>", "bos_token": "<|bos|>"})");
  write("docs.txt", "abc ab\n%\nba\n");
  PrepareDataOptions options;
  options.inputs = {(dir_ / "docs.txt").string()};
  options.out_dir = (dir_ / "out").string();
  options.tokenizer = (dir_ / "model").string();  // a model directory
  options.separator = "%";
  options.val_fraction = 0.0;
  const PrepareDataResult r = prepare_data(options);
  EXPECT_EQ(r.tokenizer_path, (dir_ / "out/tokenizer.json").string());
  EXPECT_TRUE(fs::is_regular_file(dir_ / "out/tokenizer_config.json"));
  EXPECT_FALSE(fs::exists(dir_ / "out/tokenizer.model"));
  ASSERT_EQ(r.train_shards.size(), 1u);
  // Each document: BOS, then its tokens ("abc ab\n" -> abc, Ġab, Ċ is not in the vocabulary).
  EXPECT_EQ(shard_tokens(r.train_shards[0]), (std::vector<uint32_t>{8, 5, 6, 8, 1, 0}));

  // No BOS anywhere (no template, a config naming only EOS): documents end with EOS.
  json j = tiny();
  j["post_processor"] = nullptr;
  write("model/tokenizer.json", j.dump());
  write("model/tokenizer_config.json", R"({"eos_token": "<|eos|>", "bos_token": null})");
  const PrepareDataResult eos = prepare_data(options);
  EXPECT_EQ(shard_tokens(eos.train_shards[0]), (std::vector<uint32_t>{5, 6, 9, 1, 0, 9}));
}

void expect_refused(const std::string& path, const std::string& message) {
  try {
    HfTokenizer tok(path);
    ADD_FAILURE() << "loaded " << path;
  } catch (const DataError& e) {
    EXPECT_EQ(std::string(e.what()), path + ": " + message);
  }
}

TEST_F(HfTokenizerTest, RefusesUnsupportedComponents) {
  json j = tiny();
  j["model"]["type"] = "WordPiece";
  expect_refused(write("a.json", j.dump()),
                 "model.type 'WordPiece' is not supported (supported: BPE)");
  j = tiny();
  j["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers", {tiny()["pre_tokenizer"], {{"type", "Punctuation"}}}}};
  expect_refused(write("b.json", j.dump()),
                 "pre_tokenizer.pretokenizers[1].type 'Punctuation' is not supported (supported: "
                 "ByteLevel, Split, Metaspace, Sequence, Digits)");
  j = tiny();
  j["normalizer"] = {{"type", "Lowercase"}};
  expect_refused(write("c.json", j.dump()),
                 "normalizer.type 'Lowercase' is not supported (supported: NFC, NFD, NFKC, NFKD, "
                 "Prepend, Replace, Sequence)");
  j = tiny();
  j["model"]["continuing_subword_prefix"] = "##";
  expect_refused(write("d.json", j.dump()),
                 "model.continuing_subword_prefix \"##\" is not supported (only null or \"\")");
  j = tiny();
  j["decoder"] = {{"type", "Replace"}, {"pattern", {{"Regex", "a+"}}}, {"content", "b"}};
  expect_refused(write("e.json", j.dump()),
                 "decoder.pattern {\"Regex\":\"a+\"} is not supported (only a String pattern)");
}

TEST_F(HfTokenizerTest, RefusesMalformedFiles) {
  auto message = [&](const std::string& name, const std::string& text) {
    const std::string path = write(name, text);
    try {
      HfTokenizer tok(path);
    } catch (const DataError& e) {
      return std::string(e.what());
    }
    return std::string("loaded");
  };
  EXPECT_NE(message("a.json", "{\"model\": ").find("a.json is not valid JSON"), std::string::npos);
  EXPECT_NE(message("b.json", "[1, 2]").find("must be a JSON object"), std::string::npos);
  json j = tiny();
  j["model"]["merges"] = json::array({json::array({"a", "zz"})});
  EXPECT_NE(message("c.json", j.dump()).find("model.merges[0] names \"zz\""), std::string::npos);
  j = tiny();
  j["model"]["vocab"]["a"] = -1;
  EXPECT_NE(message("d.json", j.dump()).find("model.vocab[\"a\"] must be an id"),
            std::string::npos);
  j = tiny();
  j["model"].erase("vocab");
  EXPECT_NE(message("e.json", j.dump()).find("model.vocab is missing"), std::string::npos);
  j = tiny();
  j["pre_tokenizer"] = {
      {"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}};
  EXPECT_NE(message("f.json", j.dump()).find("cannot be compiled"), std::string::npos);
  j = tiny();
  j["added_tokens"][0]["id"] = "eight";
  EXPECT_NE(message("g.json", j.dump()).find("added_tokens[0].id must be an id"),
            std::string::npos);
  j = tiny();
  j["added_tokens"][0]["id"] = 1 << 30;  // would make every per-id table 2^30 long
  EXPECT_NE(message("i.json", j.dump()).find("added_tokens[0].id 1073741824 is far beyond"),
            std::string::npos);
  j = tiny();
  j["post_processor"]["special_tokens"]["<|bos|>"]["ids"] = {77};
  EXPECT_NE(message("j.json", j.dump()).find("adds id 77, which is no token"), std::string::npos);
  EXPECT_NE(message("h.json", std::string("\x00\x01", 2)).find("not valid JSON"),
            std::string::npos);
}

}  // namespace
}  // namespace strata
