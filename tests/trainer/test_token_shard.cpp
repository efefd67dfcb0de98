// llm.c token shards: round trip and rejection of malformed files.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <utility>

#include "tests/common/temp_dir.h"
#include "trainer/data/token_shard.h"

namespace strata {
namespace {

using testing::TempDir;

std::string error_opening(const std::string& path) {
  try {
    TokenShard shard(path);
  } catch (const DataError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected DataError for " << path;
  return "";
}

void write_raw(const std::string& path, const std::vector<int32_t>& header_ints,
               size_t token_bytes) {
  std::vector<int32_t> header(256, 0);
  std::copy(header_ints.begin(), header_ints.end(), header.begin());
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(header.data()), 1024);
  std::string zeros(token_bytes, '\0');
  out.write(zeros.data(), zeros.size());
}

TEST(TokenShard, Uint16RoundTripWithLlmcHeader) {
  TempDir dir;
  const std::vector<uint32_t> tokens = {0, 1, 65535, 42, 7};
  write_token_shard(dir / "a.bin", tokens, 65536);
  std::ifstream raw(dir / "a.bin", std::ios::binary);
  int32_t header[3];
  raw.read(reinterpret_cast<char*>(header), sizeof(header));
  EXPECT_EQ(header[0], 20240520);
  EXPECT_EQ(header[1], 1);
  EXPECT_EQ(header[2], 5);
  TokenShard shard(dir / "a.bin");
  EXPECT_EQ(shard.size(), 5);
  EXPECT_EQ(shard.bytes_per_token(), 2);
  for (size_t i = 0; i < tokens.size(); ++i) EXPECT_EQ(shard.token(i), tokens[i]);
  EXPECT_EQ(shard.max_token(), 65535u);
  std::vector<int64_t> out(3);
  shard.read(1, 3, out.data());
  EXPECT_EQ(out, (std::vector<int64_t>{1, 65535, 42}));
  EXPECT_FALSE(std::filesystem::exists(dir / "a.bin.tmp"));
}

TEST(TokenShard, Uint32VariantForLargeVocabularies) {
  TempDir dir;
  const std::vector<uint32_t> tokens = {128000, 3, 128255};
  write_token_shard(dir / "b.bin", tokens, 128256);
  std::ifstream raw(dir / "b.bin", std::ios::binary);
  int32_t header[3];
  raw.read(reinterpret_cast<char*>(header), sizeof(header));
  EXPECT_EQ(header[0], 20240801);
  EXPECT_EQ(header[1], 7);
  EXPECT_EQ(header[2], 3);
  TokenShard shard(dir / "b.bin");
  EXPECT_EQ(shard.bytes_per_token(), 4);
  EXPECT_EQ(shard.max_token(), 128255u);
  EXPECT_EQ(shard.token(2), 128255u);
  EXPECT_EQ(std::filesystem::file_size(dir / "b.bin"), 1024u + 12u);
}

TEST(TokenShard, RejectsBadMagic) {
  TempDir dir;
  write_raw(dir / "x.bin", {12345, 1, 2}, 4);
  const std::string e = error_opening(dir / "x.bin");
  EXPECT_NE(e.find("is not an llm.c token shard: bad magic 12345 (expected 20240520"),
            std::string::npos)
      << e;
  EXPECT_NE(e.find("HINT:"), std::string::npos) << e;
}

TEST(TokenShard, RejectsTruncatedFiles) {
  TempDir dir;
  {
    std::ofstream out(dir / "short.bin", std::ios::binary);
    out << "tiny";
  }
  EXPECT_NE(error_opening(dir / "short.bin")
                .find("is truncated: 4 bytes, shorter than the 1024-byte header"),
            std::string::npos);
  write_raw(dir / "cut.bin", {20240520, 1, 100}, 150);
  const std::string e = error_opening(dir / "cut.bin");
  EXPECT_NE(
      e.find(
          "truncated or corrupt: its header says 100 tokens (1224 bytes), the file has 1174 bytes"),
      std::string::npos)
      << e;
}

TEST(TokenShard, RejectsUnknownVersionAndMissingFile) {
  TempDir dir;
  write_raw(dir / "v.bin", {20240520, 3, 0}, 0);
  EXPECT_NE(error_opening(dir / "v.bin").find("has version 3; magic 20240520 needs version 1"),
            std::string::npos);
  write_raw(dir / "w.bin", {20240801, 1, 0}, 0);
  EXPECT_NE(error_opening(dir / "w.bin").find("has version 1; magic 20240801 needs version 7"),
            std::string::npos);
  const std::string missing = error_opening(dir / "absent.bin");
  EXPECT_NE(missing.find("cannot open token shard " + (dir / "absent.bin") +
                         ": No such file or directory"),
            std::string::npos)
      << missing;
  EXPECT_NE(missing.find("HINT:"), std::string::npos);
}

TEST(TokenShard, RejectsANegativeTokenCount) {
  TempDir dir;
  write_raw(dir / "n.bin", {20240520, 1, -4}, 0);
  EXPECT_NE(error_opening(dir / "n.bin").find("truncated or corrupt: its header says -4 tokens"),
            std::string::npos);
}

TEST(TokenShard, EmptyShardsAreValid) {
  TempDir dir;
  write_token_shard(dir / "empty.bin", {}, 100);
  TokenShard shard(dir / "empty.bin");
  EXPECT_EQ(shard.size(), 0);
  EXPECT_EQ(shard.max_token(), 0u);
}

TEST(TokenShard, WriteFailuresNameTheFile) {
  TempDir dir;
  try {
    write_token_shard(dir / "no/such/dir/x.bin", {1, 2}, 10);
    FAIL();
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("cannot create " + (dir / "no/such/dir/x.bin.tmp")),
              std::string::npos)
        << e.what();
  }
}

TEST(TokenShard, MovedShardsKeepTheirMapping) {
  TempDir dir;
  write_token_shard(dir / "m.bin", {5, 6, 7}, 10);
  TokenShard a(dir / "m.bin");
  TokenShard b(std::move(a));
  EXPECT_EQ(b.token(2), 7u);
  TokenShard c(dir / "m.bin");
  c = std::move(b);
  EXPECT_EQ(c.size(), 3);
  EXPECT_EQ(c.token(0), 5u);
}

TEST(TokenShard, PatternExpansionIsSortedAndFailsClearly) {
  TempDir dir;
  write_token_shard(dir / "train_000001.bin", {1}, 10);
  write_token_shard(dir / "train_000000.bin", {1}, 10);
  const auto paths = expand_shard_pattern(dir / "train_*.bin");
  ASSERT_EQ(paths.size(), 2u);
  EXPECT_EQ(paths[0], dir / "train_000000.bin");
  EXPECT_EQ(paths[1], dir / "train_000001.bin");
  // An existing path is taken as is, even when it looks like a pattern.
  write_token_shard(dir / "odd[1].bin", {1}, 10);
  EXPECT_EQ(expand_shard_pattern(dir / "odd[1].bin"), std::vector<std::string>{dir / "odd[1].bin"});
  try {
    expand_shard_pattern(dir / "val_*.bin");
    FAIL();
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("no token shards match '" + (dir / "val_*.bin") + "'"),
              std::string::npos);
  }
}

}  // namespace
}  // namespace strata
