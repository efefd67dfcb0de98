// Data loader: sampling is a pure function of (seed, step, index), independent of ranks.
#include <gtest/gtest.h>

#include <set>

#include "tests/trainer/temp_dir.h"
#include "trainer/data_loader.h"

namespace strata {
namespace {

using testing::TempDir;

// Two shards whose token at position i is (shard * 1000 + i) % vocab: a window's tokens
// identify where it came from.
std::string make_shards(const TempDir& dir, int64_t vocab = 4096) {
  for (int s = 0; s < 2; ++s) {
    std::vector<uint32_t> tokens;
    for (int i = 0; i < 300 + 200 * s; ++i) tokens.push_back((s * 1000 + i) % vocab);
    write_token_shard(dir / ("train_00000" + std::to_string(s) + ".bin"), tokens, vocab);
  }
  return dir / "train_*.bin";
}

TEST(TokenDataset, SampleStartIsAPureFunctionInsideOneShard) {
  TempDir dir;
  TokenDataset data(make_shards(dir), 16, 4096);
  EXPECT_EQ(data.num_tokens(), 800);
  std::set<int64_t> starts;
  for (int64_t i = 0; i < 2000; ++i) {
    const int64_t s = data.sample_start(7, 3, i);
    EXPECT_EQ(s, data.sample_start(7, 3, i));
    // window [s, s + 17) lies in shard 0 = [0, 300) or shard 1 = [300, 800)
    EXPECT_TRUE((s >= 0 && s + 17 <= 300) || (s >= 300 && s + 17 <= 800)) << s;
    starts.insert(s);
  }
  EXPECT_GT(starts.size(), 600u);  // 767 possible starts, 2000 draws
  EXPECT_NE(data.sample_start(7, 3, 0), data.sample_start(7, 4, 0));
  EXPECT_NE(data.sample_start(7, 3, 0), data.sample_start(8, 3, 0));
}

TEST(TokenDataset, BatchTargetsAreInputsShiftedByOne) {
  TempDir dir;
  TokenDataset data(make_shards(dir), 8, 4096);
  TokenBatch b = data.sample_batch(1, 1, 0, 4);
  ASSERT_EQ(b.inputs.size(), 32u);
  for (int64_t r = 0; r < 4; ++r) {
    for (int64_t t = 0; t < 8; ++t) EXPECT_EQ(b.targets[r * 8 + t], b.inputs[r * 8 + t] + 1);
  }
}

TEST(TokenDataset, RanksSlicingTheGlobalBatchSeeTheSameSamples) {
  TempDir dir;
  TokenDataset data(make_shards(dir), 8, 4096);
  const int64_t global = 16, micro = 2;
  for (int64_t step : {1, 2, 50}) {
    const TokenBatch one_rank = data.sample_batch(5, step, 0, global);
    const int64_t ranks = 4, accumulation = global / (micro * ranks);
    std::vector<int64_t> gathered(global * 8);
    for (int64_t a = 0; a < accumulation; ++a) {
      for (int64_t r = 0; r < ranks; ++r) {
        const int64_t first = a * (ranks * micro) + r * micro;
        const TokenBatch slice = data.sample_batch(5, step, first, micro);
        std::copy(slice.inputs.begin(), slice.inputs.end(), gathered.begin() + first * 8);
      }
    }
    EXPECT_EQ(gathered, one_rank.inputs) << "step " << step;
  }
}

TEST(TokenDataset, SequentialWindowsWalkShardsInOrder) {
  TempDir dir;
  TokenDataset data(make_shards(dir), 100, 4096);
  EXPECT_EQ(data.num_sequential_windows(), 2 + 4);  // (300-1)/100 + (500-1)/100
  TokenBatch b = data.sequential_batch(1, 2);
  EXPECT_EQ(b.inputs[0], 100);   // shard 0, window 1
  EXPECT_EQ(b.inputs[100], 1000 % 4096);  // shard 1, window 0
  EXPECT_EQ(b.targets[199], 1100);
  EXPECT_THROW(data.sequential_batch(5, 2), std::out_of_range);
}

TEST(TokenDataset, RejectsTokensOutsideTheVocabulary) {
  TempDir dir;
  const std::string pattern = make_shards(dir);
  try {
    TokenDataset data(pattern, 8, 1000);
    FAIL();
  } catch (const DataError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("outside model.vocab_size 1000"), std::string::npos) << m;
    EXPECT_NE(m.find("HINT: set model.vocab_size"), std::string::npos) << m;
  }
}

TEST(TokenDataset, RejectsShardsShorterThanOneWindow) {
  TempDir dir;
  write_token_shard(dir / "tiny.bin", {1, 2, 3}, 10);
  try {
    TokenDataset data(dir / "tiny.bin", 8, 10);
    FAIL();
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("lower data.seq_len"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace strata
