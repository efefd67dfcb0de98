// Data loader: sampling is a pure function of (seed, step, index), independent of ranks.
#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "tests/common/temp_dir.h"
#include "trainer/data/data_loader.h"
#include "trainer/data/instruction_data.h"

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
  int same_step = 0, same_seed = 0;
  for (int64_t i = 0; i < 100; ++i) {
    same_step += data.sample_start(7, 3, i) == data.sample_start(7, 4, i);
    same_seed += data.sample_start(7, 3, i) == data.sample_start(8, 3, i);
  }
  EXPECT_LT(same_step, 5);
  EXPECT_LT(same_seed, 5);
}

TEST(TokenDataset, SamplesAreUniformOverAllWindowStarts) {
  TempDir dir;
  TokenDataset data(make_shards(dir), 16, 4096);
  // 284 starts in shard 0, 484 in shard 1; each start equally likely.
  const int draws = 20000;
  std::vector<int> per_start(800, 0);
  for (int64_t i = 0; i < draws; ++i) ++per_start[data.sample_start(11, i / 100, i % 100)];
  int shard0 = 0, covered = 0, largest = 0;
  for (int s = 0; s < 800; ++s) {
    if (s < 300) shard0 += per_start[s];
    covered += per_start[s] > 0;
    largest = std::max(largest, per_start[s]);
  }
  EXPECT_NEAR(shard0 / static_cast<double>(draws), 284.0 / 768.0, 0.02);
  EXPECT_EQ(covered, 768);  // ~26 draws per start: every start is hit
  EXPECT_LT(largest, 3 * draws / 768);
}

TEST(TokenDataset, ShardsShorterThanAWindowAreNeverSampled) {
  TempDir dir;
  write_token_shard(dir / "train_000000.bin", {1, 2, 3, 4, 5}, 100);
  write_token_shard(dir / "train_000001.bin", std::vector<uint32_t>(10, 7), 100);  // one window
  write_token_shard(dir / "train_000002.bin", {}, 100);
  TokenDataset data(dir / "train_*.bin", 9, 100);
  for (int64_t i = 0; i < 50; ++i) EXPECT_EQ(data.sample_start(1, 0, i), 5);
  const TokenBatch b = data.sample_batch(1, 0, 0, 2);
  EXPECT_EQ(b.inputs, std::vector<int64_t>(18, 7));
}

TEST(TokenDataset, BatchTargetsAreInputsShiftedByOne) {
  TempDir dir;
  TokenDataset data(make_shards(dir), 8, 4096);
  TokenBatch b = data.sample_batch(1, 1, 0, 4);
  EXPECT_EQ(b.batch, 4);
  EXPECT_EQ(b.seq_len, 8);
  ASSERT_EQ(b.inputs.size(), 32u);
  ASSERT_EQ(b.targets.size(), 32u);
  for (int64_t r = 0; r < 4; ++r) {
    const int64_t start = data.sample_start(1, 1, r);
    const int64_t first = start < 300 ? start : 1000 + (start - 300);
    EXPECT_EQ(b.inputs[r * 8], first % 4096);
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
  EXPECT_EQ(b.inputs[0], 100);            // shard 0, window 1
  EXPECT_EQ(b.inputs[100], 1000 % 4096);  // shard 1, window 0
  EXPECT_EQ(b.targets[199], 1100);
  EXPECT_THROW(data.sequential_batch(5, 2), std::out_of_range);
  // A shard of exactly k * seq_len + 1 tokens holds k windows, the last ending at its end.
  TempDir exact;
  std::vector<uint32_t> tokens(21);
  for (int i = 0; i < 21; ++i) tokens[i] = i;
  write_token_shard(exact / "a.bin", tokens, 100);
  TokenDataset two(exact / "a.bin", 10, 100);
  EXPECT_EQ(two.num_sequential_windows(), 2);
  EXPECT_EQ(two.sequential_batch(1, 1).targets.back(), 20);
}

TEST(TokenDataset, RejectsNonPositiveSizes) {
  TempDir dir;
  const std::string pattern = make_shards(dir);
  EXPECT_THROW(TokenDataset(pattern, 0, 4096), DataError);
  EXPECT_THROW(TokenDataset(pattern, 8, 0), DataError);
}

TEST(TokenDataset, RejectsTokensOutsideTheVocabulary) {
  TempDir dir;
  const std::string pattern = make_shards(dir);
  try {
    TokenDataset data(pattern, 8, 1000);
    FAIL();
  } catch (const DataError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("token shard " + (dir / "train_000001.bin") + " holds token id 1499"),
              std::string::npos)
        << m;
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

namespace strata {
namespace {

// Packed shards of windows of 9 tokens (seq_len 8) whose token i is 100 * window + i, with
// a loss mask that marks the second half of every window, and documents starting at tokens 0
// and 4 of each.
std::string make_packed(const testing::TempDir& dir, int windows_per_shard = 3) {
  int window_index = 0;
  for (int s = 0; s < 2; ++s) {
    std::vector<uint32_t> tokens;
    std::vector<uint8_t> mask;
    for (int w = 0; w < windows_per_shard; ++w, ++window_index) {
      for (int i = 0; i < 9; ++i) {
        tokens.push_back(100 * window_index + i);
        mask.push_back((i >= 5 ? kMaskTarget : 0) | (i == 0 || i == 4 ? kMaskDocumentStart : 0));
      }
    }
    const std::string path = dir / ("sft_00000" + std::to_string(s) + ".bin");
    write_token_shard(path, tokens, 4096, 9);
    write_mask_shard(mask_path_of(path), mask, 9);
  }
  return dir / "sft_*.bin";
}

TEST(TokenDataset, PackedShardsAreSampledWindowByWindowWithTheirMask) {
  testing::TempDir dir;
  TokenDataset data(make_packed(dir), 8, 4096);
  EXPECT_TRUE(data.packed());
  EXPECT_TRUE(data.has_loss_mask());
  EXPECT_EQ(mask_path_of(dir / "sft_000000.bin"), dir / "sft_000000.mask");
  std::set<int64_t> windows;
  for (int64_t i = 0; i < 200; ++i) {
    const TokenBatch b = data.sample_batch(5, 2, i, 1);
    // A whole window: inputs 100w + [0, 8), targets 100w + [1, 9); targets 5..8 count.
    const int64_t w = b.inputs[0] / 100;
    windows.insert(w);
    for (int t = 0; t < 8; ++t) {
      EXPECT_EQ(b.inputs[t], 100 * w + t);
      EXPECT_EQ(b.targets[t], 100 * w + t + 1);
      EXPECT_EQ(b.loss_mask[t], t + 1 >= 5 ? 1 : 0) << t;
      EXPECT_EQ(b.doc_start[t], t == 0 || t == 4 ? 1 : 0) << t;
    }
    EXPECT_EQ(b.target_count(), 4);
  }
  EXPECT_EQ(windows, (std::set<int64_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(data.sample_target_count(5, 2, 0, 10), 40);
  EXPECT_EQ(data.sample_batch(5, 2, 0, 10).target_count(), 40);
  // Validation walks the windows in order.
  EXPECT_EQ(data.num_sequential_windows(), 6);
  const TokenBatch v = data.sequential_batch(2, 2);
  EXPECT_EQ(v.inputs[0], 200);
  EXPECT_EQ(v.inputs[8], 300);
  EXPECT_EQ(v.targets[15], 308);
  EXPECT_EQ(v.target_count(), 8);
}

TEST(TokenDataset, RefusesPackedShardsOfAnotherSeqLenAndMixedKinds) {
  testing::TempDir dir;
  const std::string pattern = make_packed(dir);
  try {
    TokenDataset(pattern, 16, 4096);
    ADD_FAILURE() << "expected a DataError";
  } catch (const DataError& e) {
    EXPECT_EQ(std::string(e.what()),
              "token shard " + dir / "sft_000000.bin" +
                  " is packed in windows of 9 tokens, for data.seq_len 8, but data.seq_len is "
                  "16\nHINT: set data.seq_len to 8, or prepare the data again with --seq-len 16");
  }
  // A plain stream beside packed shards.
  write_token_shard(dir / "sft_000002.bin", std::vector<uint32_t>(50, 1), 4096);
  try {
    TokenDataset(pattern, 8, 4096);
    ADD_FAILURE() << "expected a DataError";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("mix kinds: " + dir / "sft_000000.bin" +
                                         " is packed with a loss mask, " + dir / "sft_000002.bin" +
                                         " is a token stream"),
              std::string::npos)
        << e.what();
  }
}

TEST(TokenDataset, RefusesALossMaskOfAnotherShard) {
  testing::TempDir dir;
  const std::string pattern = make_packed(dir, 1);
  write_mask_shard(dir / "sft_000001.mask", std::vector<uint8_t>(18, 1), 9);
  try {
    TokenDataset(pattern, 8, 4096);
    ADD_FAILURE() << "expected a DataError";
  } catch (const DataError& e) {
    EXPECT_EQ(std::string(e.what()),
              "loss mask " + dir / "sft_000001.mask" + " does not belong to token shard " +
                  dir / "sft_000001.bin" +
                  ": 18 entries, the shard has 9 tokens\nHINT: (re)create both with `strata "
                  "prepare-data`");
  }
  // A packed length that does not divide the shard is a corrupt header.
  write_token_shard(dir / "odd.bin", std::vector<uint32_t>(10, 1), 4096, 4);
  EXPECT_THROW(TokenShard(dir / "odd.bin"), DataError);
}

}  // namespace
}  // namespace strata

namespace strata {
namespace {

EncodedRecord record_of(uint32_t first, int length, int targets_from) {
  EncodedRecord r;
  for (int i = 0; i < length; ++i) {
    r.tokens.push_back(first + i);
    r.mask.push_back(i >= targets_from ? 1 : 0);
  }
  return r;
}

// Records go whole into windows of 8: a record that does not fit closes the window (padded
// with the pad id, mask 0); one longer than a window is cut (truncate) or left out (drop).
TEST(WindowPacker, PacksWholeRecordsAndCountsWhatItCutsOrDrops) {
  for (const bool truncate : {true, false}) {
    std::vector<std::vector<uint32_t>> windows;
    std::vector<std::vector<uint8_t>> masks;
    WindowPacker packer(8, truncate, 99, [&](const auto& tokens, const auto& mask) {
      windows.push_back(tokens);
      masks.push_back(mask);
    });
    packer.add(record_of(10, 3, 1));   // window 0: 10 11 12
    packer.add(record_of(20, 4, 2));   // window 0: + 20 21 22 23 (7 tokens)
    packer.add(record_of(30, 2, 0));   // does not fit: window 0 padded, window 1: 30 31
    packer.add(record_of(40, 11, 9));  // longer than a window
    packer.add(record_of(50, 6, 5));   // fits after 30 31 (or after the truncated record: no)
    packer.finish();
    const PackingStats& s = packer.stats();
    if (truncate) {
      ASSERT_EQ(windows.size(), 4u);
      EXPECT_EQ(windows[0], (std::vector<uint32_t>{10, 11, 12, 20, 21, 22, 23, 99}));
      // Targets (bit 0) as the records say; documents (bit 1) start at each record and at the
      // padding.
      EXPECT_EQ(masks[0], (std::vector<uint8_t>{2, 1, 1, 2, 0, 1, 1, 2}));
      EXPECT_EQ(masks[1], (std::vector<uint8_t>{3, 1, 2, 0, 0, 0, 0, 0}));
      EXPECT_EQ(windows[1], (std::vector<uint32_t>{30, 31, 99, 99, 99, 99, 99, 99}));
      EXPECT_EQ(windows[2], (std::vector<uint32_t>{40, 41, 42, 43, 44, 45, 46, 47}));
      EXPECT_EQ(masks[2], (std::vector<uint8_t>{2, 0, 0, 0, 0, 0, 0, 0}));  // targets past the cut
      EXPECT_EQ(windows[3], (std::vector<uint32_t>{50, 51, 52, 53, 54, 55, 99, 99}));
      EXPECT_EQ(s.truncated, 1);
      EXPECT_EQ(s.dropped, 0);
      EXPECT_EQ(s.records, 5);
      EXPECT_EQ(s.padding, 1 + 6 + 0 + 2);
      EXPECT_EQ(s.targets, 4 + 2 + 0 + 1);
    } else {
      ASSERT_EQ(windows.size(), 2u);
      EXPECT_EQ(windows[1], (std::vector<uint32_t>{30, 31, 50, 51, 52, 53, 54, 55}));
      EXPECT_EQ(masks[1], (std::vector<uint8_t>{3, 1, 2, 0, 0, 0, 0, 1}));
      EXPECT_EQ(s.truncated, 0);
      EXPECT_EQ(s.dropped, 1);
      EXPECT_EQ(s.records, 4);
      EXPECT_EQ(s.padding, 1);
    }
    EXPECT_EQ(s.windows, static_cast<int64_t>(windows.size()));
    EXPECT_EQ(s.tokens, 8 * s.windows);
  }
}

}  // namespace
}  // namespace strata
