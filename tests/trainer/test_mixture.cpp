// Data mixtures (data.sources): the source draw, its proportions, batches assembled across
// sources of different kinds, one source bit for bit as TokenDataset, and the config errors.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "tests/common/temp_dir.h"
#include "trainer/config/config.h"
#include "trainer/data/mixture.h"

namespace strata {
namespace {

using testing::TempDir;

#define EXPECT_HAS(haystack, needle)                               \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) \
      << "message: " << (haystack) << "\nexpected to contain: " << (needle)

// A token stream whose tokens are 1000 * id + position % 1000: a row says its source.
std::string make_stream(const TempDir& dir, int id, int64_t tokens = 600) {
  std::vector<uint32_t> values;
  for (int64_t i = 0; i < tokens; ++i) values.push_back(1000 * id + i % 1000);
  const std::string path = dir / ("stream" + std::to_string(id) + "_000000.bin");
  write_token_shard(path, values, 8192);
  return path;
}

// Packed windows of 9 tokens (seq_len 8) with a loss mask: tokens 1000 * id + 10 * w + t, the
// targets from position 5 count, a second document starts at position 4.
std::string make_packed(const TempDir& dir, int id, int windows = 6) {
  std::vector<uint32_t> tokens;
  std::vector<uint8_t> mask;
  for (int w = 0; w < windows; ++w) {
    for (int t = 0; t < 9; ++t) {
      tokens.push_back(1000 * id + 10 * w + t);
      mask.push_back(static_cast<uint8_t>((t >= 5 ? kMaskTarget : 0) |
                                          (t == 0 || t == 4 ? kMaskDocumentStart : 0)));
    }
  }
  const std::string path = dir / ("packed" + std::to_string(id) + "_000000.bin");
  write_token_shard(path, tokens, 8192, 9);
  write_mask_shard(mask_path_of(path), mask, 9);
  return path;
}

DataMixture mixture_of(const std::vector<std::string>& paths, const std::vector<double>& weights,
                       int64_t seq_len = 8) {
  std::vector<MixtureSource> sources;
  for (size_t k = 0; k < paths.size(); ++k) {
    sources.push_back({"s" + std::to_string(k), weights[k], TokenDataset(paths[k], seq_len, 8192)});
  }
  return DataMixture(std::move(sources));
}

// |count - n p| <= 5 sqrt(n p (1 - p)) for every source over n = 10 000 draws.
void expect_proportions(const std::vector<double>& weights, uint64_t seed) {
  TempDir dir;
  std::vector<std::string> paths;
  for (size_t k = 0; k < weights.size(); ++k)
    paths.push_back(make_stream(dir, static_cast<int>(k)));
  const DataMixture mix = mixture_of(paths, weights);
  double total = 0;
  for (double w : weights) total += w;
  std::vector<int64_t> counts(weights.size(), 0);
  const int64_t steps = 100, per_step = 100, n = steps * per_step;
  for (int64_t step = 0; step < steps; ++step) {
    const std::vector<int64_t> c = mix.source_counts(seed, step, 0, per_step);
    for (size_t k = 0; k < c.size(); ++k) counts[k] += c[k];
  }
  for (size_t k = 0; k < weights.size(); ++k) {
    const double p = weights[k] / total;
    EXPECT_NEAR(mix.probability(k), p, 1e-12);
    const double sd = std::sqrt(static_cast<double>(n) * p * (1 - p));
    EXPECT_LE(std::abs(static_cast<double>(counts[k]) - n * p), 5 * sd)
        << "source " << k << " weight " << weights[k] << ": " << counts[k] << " of " << n;
  }
}

TEST(DataMixture, ProportionsFollowTheWeightsWithinBinomialBounds) {
  expect_proportions({5, 3, 2}, 1234);
  expect_proportions({0.5, 0.3, 0.2}, 99);  // weights need not sum to 1; these do
  expect_proportions({1, 1, 0.01}, 7);      // ~0.5% of the draws
  expect_proportions({1, 3}, 2024);
}

TEST(DataMixture, RowsComeFromTheDrawnSourceAtItsOwnWindow) {
  TempDir dir;
  const std::string a = make_stream(dir, 1), b = make_stream(dir, 2);
  const DataMixture mix = mixture_of({a, b}, {1, 1});
  const TokenDataset da(a, 8, 8192), db(b, 8, 8192);
  const TokenBatch batch = mix.sample_batch(5, 3, 0, 64);
  ASSERT_EQ(batch.batch, 64);
  ASSERT_EQ(batch.inputs.size(), 64u * 8);
  EXPECT_TRUE(batch.loss_mask.empty());
  EXPECT_TRUE(batch.doc_start.empty());
  std::vector<int> seen(2, 0);
  for (int64_t i = 0; i < 64; ++i) {
    const size_t k = mix.source_of(5, 3, i);
    ++seen[k];
    const TokenBatch own = (k == 0 ? da : db).sample_batch(5, 3, i, 1);
    EXPECT_EQ(batch.inputs[i * 8] / 1000, static_cast<int64_t>(k) + 1);
    for (int t = 0; t < 8; ++t) {
      EXPECT_EQ(batch.inputs[i * 8 + t], own.inputs[t]);
      EXPECT_EQ(batch.targets[i * 8 + t], own.targets[t]);
    }
  }
  EXPECT_GT(seen[0], 10);
  EXPECT_GT(seen[1], 10);
}

TEST(DataMixture, TheDrawDoesNotDependOnHowIndicesAreSplit) {
  TempDir dir;
  const DataMixture mix =
      mixture_of({make_stream(dir, 0), make_packed(dir, 1), make_stream(dir, 2)}, {2, 1, 1});
  for (int64_t step : {0, 1, 17}) {
    const TokenBatch whole = mix.sample_batch(42, step, 0, 32);
    const int64_t whole_targets = mix.sample_target_count(42, step, 0, 32);
    EXPECT_EQ(whole_targets, whole.target_count());
    // As 4 ranks x 2 accumulation steps x micro-batch 4 would read it, and one by one.
    for (int64_t micro : {1, 4, 8}) {
      int64_t targets = 0;
      std::vector<int64_t> counts(3, 0);
      for (int64_t first = 0; first < 32; first += micro) {
        const TokenBatch part = mix.sample_batch(42, step, first, micro);
        for (int64_t j = 0; j < micro * 8; ++j) {
          EXPECT_EQ(part.inputs[j], whole.inputs[first * 8 + j]);
          EXPECT_EQ(part.targets[j], whole.targets[first * 8 + j]);
          EXPECT_EQ(part.loss_mask[j], whole.loss_mask[first * 8 + j]);
          EXPECT_EQ(part.doc_start[j], whole.doc_start[first * 8 + j]);
        }
        targets += mix.sample_target_count(42, step, first, micro);
        const std::vector<int64_t> c = mix.source_counts(42, step, first, micro);
        for (size_t k = 0; k < 3; ++k) counts[k] += c[k];
      }
      EXPECT_EQ(targets, whole_targets);
      EXPECT_EQ(counts, mix.source_counts(42, step, 0, 32));
    }
  }
  // A pure function of (seed, step, index); another seed or step draws otherwise.
  int same_seed = 0, same_step = 0;
  for (int64_t i = 0; i < 200; ++i) {
    EXPECT_EQ(mix.source_of(42, 3, i), mix.source_of(42, 3, i));
    same_seed += mix.source_of(42, 3, i) == mix.source_of(43, 3, i);
    same_step += mix.source_of(42, 3, i) == mix.source_of(42, 4, i);
  }
  EXPECT_LT(same_seed, 160);  // ~ 0.375 of 200 agree by chance
  EXPECT_LT(same_step, 160);
}

TEST(DataMixture, OneSourceIsItsTokenDatasetBitForBit) {
  TempDir dir;
  for (const std::string& path : {make_stream(dir, 3), make_packed(dir, 4)}) {
    const TokenDataset data(path, 8, 8192);
    const DataMixture mix = mixture_of({path}, {0.25});
    EXPECT_EQ(mix.has_loss_mask(), data.has_loss_mask());
    EXPECT_EQ(mix.has_documents(), data.has_documents());
    EXPECT_EQ(mix.probability(0), 1.0);
    for (int64_t step : {0, 5}) {
      const TokenBatch a = mix.sample_batch(9, step, 3, 16), b = data.sample_batch(9, step, 3, 16);
      EXPECT_EQ(a.batch, b.batch);
      EXPECT_EQ(a.seq_len, b.seq_len);
      EXPECT_EQ(a.inputs, b.inputs);
      EXPECT_EQ(a.targets, b.targets);
      EXPECT_EQ(a.loss_mask, b.loss_mask);
      EXPECT_EQ(a.doc_start, b.doc_start);
      EXPECT_EQ(mix.sample_target_count(9, step, 3, 16), data.sample_target_count(9, step, 3, 16));
      EXPECT_EQ(mix.source_counts(9, step, 3, 16), std::vector<int64_t>{16});
      EXPECT_EQ(mix.source_of(9, step, 3), 0u);
    }
  }
}

TEST(DataMixture, MaskedAndUnmaskedSourcesMix) {
  TempDir dir;
  const std::string packed = make_packed(dir, 1), stream = make_stream(dir, 2);
  const DataMixture mix = mixture_of({packed, stream}, {1, 1});
  EXPECT_TRUE(mix.has_loss_mask());
  EXPECT_TRUE(mix.has_documents());
  const TokenDataset own_packed(packed, 8, 8192);
  const TokenBatch batch = mix.sample_batch(11, 2, 0, 40);
  ASSERT_EQ(batch.loss_mask.size(), 40u * 8);
  ASSERT_EQ(batch.doc_start.size(), 40u * 8);
  int64_t expected_targets = 0;
  std::vector<int> seen(2, 0);
  for (int64_t i = 0; i < 40; ++i) {
    const size_t k = mix.source_of(11, 2, i);
    ++seen[k];
    for (int t = 0; t < 8; ++t) {
      const size_t j = i * 8 + t;
      if (k == 0) {  // the packed source's own row: its mask and documents
        const TokenBatch own = own_packed.sample_batch(11, 2, i, 1);
        EXPECT_EQ(batch.inputs[j], own.inputs[t]);
        EXPECT_EQ(batch.loss_mask[j], own.loss_mask[t]);
        EXPECT_EQ(batch.doc_start[j], own.doc_start[t]);
        EXPECT_EQ(batch.loss_mask[j], t + 1 >= 5 ? 1 : 0);
      } else {  // the stream: every target counts, the row is one document
        EXPECT_EQ(batch.inputs[j] / 1000, 2);
        EXPECT_EQ(batch.loss_mask[j], 1);
        EXPECT_EQ(batch.doc_start[j], t == 0 ? 1 : 0);
      }
    }
    expected_targets += k == 0 ? 4 : 8;
  }
  EXPECT_GT(seen[0], 5);
  EXPECT_GT(seen[1], 5);
  EXPECT_EQ(batch.target_count(), expected_targets);
  EXPECT_EQ(mix.sample_target_count(11, 2, 0, 40), expected_targets);
}

TEST(DataMixture, RefusesSourcesOfAnotherSeqLenAndBadWeights) {
  TempDir dir;
  const std::string a = make_stream(dir, 1), b = make_stream(dir, 2);
  try {
    std::vector<MixtureSource> sources;
    sources.push_back({"web", 1.0, TokenDataset(a, 8, 8192)});
    sources.push_back({"code", 1.0, TokenDataset(b, 16, 8192)});
    DataMixture mix(std::move(sources));
    ADD_FAILURE() << "expected a DataError";
  } catch (const DataError& e) {
    EXPECT_EQ(std::string(e.what()),
              "data source 'code' has seq_len 16, but source 'web' has seq_len 8: the sources of "
              "a mixture must share one seq_len\nHINT: prepare packed sources with the run's "
              "data.seq_len");
  }
  for (double weight : {0.0, -1.0, std::nan("")}) {
    std::vector<MixtureSource> sources;
    sources.push_back({"web", weight, TokenDataset(a, 8, 8192)});
    try {
      DataMixture mix(std::move(sources));
      ADD_FAILURE() << "expected a DataError for weight " << weight;
    } catch (const DataError& e) {
      EXPECT_HAS(e.what(), "data source 'web' has weight");
      EXPECT_HAS(e.what(), "\nHINT: give every entry of data.sources a weight > 0");
    }
  }
  EXPECT_THROW(DataMixture(std::vector<MixtureSource>{}), DataError);
}

TEST(DataMixture, ValidationLossIsTheWeightedMeanOverSourcesWithVal) {
  EXPECT_DOUBLE_EQ(mixture_val_loss({{"a", 0.5, 2.0, 10}, {"b", 0.3, 4.0, 10}}),
                   (0.5 * 2.0 + 0.3 * 4.0) / 0.8);
  EXPECT_DOUBLE_EQ(mixture_val_loss({{"a", 0.2, 3.0, 10}}), 3.0);
}

// ---- data.sources in the config ---------------------------------------------------------

Config parse(const std::string& text, const std::vector<std::string>& overrides = {}) {
  return parse_config(text, "job.yaml", overrides, 1);
}

std::string error_of(const std::string& text, const std::vector<std::string>& overrides = {}) {
  try {
    parse(text, overrides);
  } catch (const ConfigError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a ConfigError for:\n" << text;
  return "";
}

const char* kSources =
    "data:\n"
    "  sources:\n"
    "    - {name: web, path: \"web/train_*.bin\", weight: 5, val: \"web/val_*.bin\"}\n"
    "    - {path: \"code/train_*.bin\", weight: 3}\n"
    "    - {name: math.v2, path: m.bin, weight: 0.01}\n";

TEST(ConfigSources, ReadNamedByPositionAndRoundTrip) {
  const Config c = parse(kSources);
  EXPECT_EQ(c.data.train, "");
  ASSERT_EQ(c.data.sources.size(), 3u);
  EXPECT_EQ(c.data.sources[0].name, "web");
  EXPECT_EQ(c.data.sources[0].path, "web/train_*.bin");
  EXPECT_EQ(c.data.sources[0].weight, 5.0);
  EXPECT_EQ(*c.data.sources[0].val, "web/val_*.bin");
  EXPECT_EQ(c.data.sources[1].name, "source1");
  EXPECT_FALSE(c.data.sources[1].val.has_value());
  EXPECT_EQ(c.data.sources[2].name, "math.v2");
  EXPECT_EQ(c.data.sources[2].weight, 0.01);
  const std::string yaml = to_yaml(c);
  EXPECT_HAS(yaml,
             "  sources:\n    - name: web\n      path: \"web/train_*.bin\"\n"
             "      weight: 5.0\n      val: \"web/val_*.bin\"\n    - name: source1\n");
  const Config again = parse(yaml);
  EXPECT_EQ(to_yaml(again), yaml);
  ASSERT_EQ(again.data.sources.size(), 3u);
  EXPECT_EQ(again.data.sources[1].name, "source1");
  EXPECT_EQ(again.data.sources[2].weight, 0.01);
  // A single dataset writes an empty list, and reads back.
  const std::string single = to_yaml(parse("data:\n  train: t.bin\n"));
  EXPECT_HAS(single, "  sources: []\n");
  EXPECT_TRUE(parse(single).data.sources.empty());
  // Overrides address entries by index, or replace the list.
  const Config o = parse(kSources, {"data.sources.1.weight=2", "data.sources.1.name=code"});
  EXPECT_EQ(o.data.sources[1].weight, 2.0);
  EXPECT_EQ(o.data.sources[1].name, "code");
  const Config l = parse("", {"data.sources=[{path: a.bin, weight: 1}, {path: b.bin, weight: 1}]"});
  EXPECT_EQ(l.data.sources[1].name, "source1");
}

TEST(ConfigSources, EveryBadInputHasItsMessage) {
  struct Case {
    std::string yaml;
    std::vector<std::string> overrides;
    std::string message, hint;
  } cases[] = {
      {"data:\n  train: t.bin\n  sources:\n    - {path: a.bin, weight: 1}\n",
       {},
       "config error: data.sources and data.train are both given (job.yaml:3:3)",
       "HINT: give either data.train (one dataset) or data.sources (a weighted mixture), not "
       "both"},
      {kSources,
       {"data.val=v.bin"},
       "config error: data.val does not apply to data.sources (--set data.val=v.bin)",
       "HINT: give each source its own validation shards: data.sources.N.val"},
      {"data:\n  sources: []\n",
       {},
       "config error: missing required key data.train (job.yaml:1:1)",
       "(or list weighted datasets under data.sources)"},
      {kSources,
       {"data.sources.1.name=''"},
       "config error: data.sources.1.name is empty (--set data.sources.1.name='')",
       "HINT: name the source with letters, digits, '_', '.' or '-', or leave name out for "
       "source1"},
      {kSources,
       {"data.sources.0.name=web site"},
       "config error: data.sources.0.name = 'web site' has characters other than letters, "
       "digits, '_', '.' and '-' (--set data.sources.0.name=web site)",
       "HINT: source names become keys of metrics.jsonl"},
      {kSources,
       {"data.sources.2.name=web"},
       "config error: data.sources.2.name 'web' names both data.sources.0 and data.sources.2 "
       "(--set data.sources.2.name=web)",
       "HINT: give every source its own name"},
      {kSources,
       {"data.sources.0.name=source1"},
       "config error: data.sources.0.name 'source1' names both data.sources.0 and "
       "data.sources.1 (--set data.sources.0.name=source1)",
       "HINT: give every source its own name (unnamed sources are source<index>)"},
      {kSources,
       {"data.sources.1.weight=0"},
       "config error: data.sources.1.weight = 0 must be positive (--set data.sources.1.weight=0)",
       "HINT: weights are relative: 5, 3 and 2 draw 50%, 30% and 20% of the samples"},
      {kSources,
       {"data.sources.2.weight=-0.5"},
       "config error: data.sources.2.weight = -0.5 must be positive",
       "HINT: weights are relative"},
      {kSources,
       {"data.sources.1.weight='3'"},
       "config error: data.sources.1.weight must be a number, got the string '3'",
       "HINT: remove the quotes"},
      {kSources,
       {"data.sources.1.path=''"},
       "config error: data.sources.1.path is empty (--set data.sources.1.path='')",
       "HINT: give a glob of the source's train shards"},
      {kSources,
       {"data.sources.1.val=''"},
       "config error: data.sources.1.val is empty",
       "HINT: give a glob of the source's val shards, or null for no validation of it"},
      {"data:\n  sources:\n    - {name: a, weight: 1}\n",
       {},
       "config error: missing required key data.sources.0.path (job.yaml:3:7)",
       "HINT: add `data.sources.0.path:` to the config"},
      {"data:\n  sources:\n    - {name: a, path: a.bin}\n",
       {},
       "config error: missing required key data.sources.0.weight (job.yaml:3:7)",
       "HINT: add `data.sources.0.weight:`"},
      {"data:\n  sources:\n    - {path: a.bin, weight: 1, wieght: 2}\n",
       {},
       "config error: unknown key data.sources.0.wieght",
       "HINT: did you mean data.sources.0.weight?"},
      {"data:\n  sources: web.bin\n",
       {},
       "config error: data.sources must be a list, got 'web.bin' (job.yaml:2:3)",
       ""},
  };
  for (const Case& c : cases) {
    const std::string e = error_of(c.yaml, c.overrides);
    EXPECT_HAS(e, c.message);
    EXPECT_HAS(e, c.hint);
  }
}

// ---- opening the sources ----------------------------------------------------------------

TEST(DataMixture, OpeningSourcesNamesTheSourceInErrorsAndOpensTheirVal) {
  TempDir dir;
  const std::string a = make_stream(dir, 1), b = make_stream(dir, 2);
  DataConfig data;
  data.seq_len = 8;
  data.sources = {{"web", a, 3, b}, {"code", b, 1, std::nullopt}};
  OpenedSources opened = open_data_sources(data, 8192, /*with_val=*/true);
  EXPECT_EQ(opened.train.num_sources(), 2u);
  EXPECT_EQ(opened.train.source(1).name, "code");
  ASSERT_EQ(opened.val.size(), 1u);
  EXPECT_EQ(opened.val[0].name, "web");
  EXPECT_DOUBLE_EQ(opened.val[0].weight, 0.75);
  EXPECT_HAS(opened.description, "data: a mixture of 2 sources\n  web (75.0%): train 600 tokens");
  EXPECT_TRUE(open_data_sources(data, 8192, /*with_val=*/false).val.empty());
  data.sources[1].path = dir / "none_*.bin";
  try {
    open_data_sources(data, 8192, true);
    ADD_FAILURE() << "expected a DataError";
  } catch (const DataError& e) {
    EXPECT_HAS(e.what(), "data source 'code' (data.sources.1): ");
    EXPECT_HAS(e.what(), "none_*.bin");
  }
}

}  // namespace
}  // namespace strata
