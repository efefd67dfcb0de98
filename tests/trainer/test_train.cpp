// Training: overfitting one batch, determinism, and learning on real text.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "parallel/process_group.h"
#include "trainer/kernels/blas.h"
#include "tests/common/mpi_environment.h"
#include "tests/common/micro_model.h"
#include "tests/common/temp_dir.h"
#include "trainer/model/llama.h"
#include "trainer/optim/adamw.h"
#include "trainer/data/prepare_data.h"
#include "trainer/data/token_shard.h"
#include "trainer/evaluate.h"
#include "trainer/train.h"

namespace strata {
namespace {

namespace fs = std::filesystem;

using testing::MpiEnvironment;

using testing::TempDir;

TEST(Training, OverfitsOneBatch) {
  at::manual_seed(0);
  ModelConfig c = testing::micro_model(64, 32);
  Llama model(c);
  model.materialize(at::kCPU);
  model.initialize(5);
  OptimizerConfig oc;
  oc.lr = 1e-2;
  oc.weight_decay = 0.0;
  AdamW opt(oc);
  std::vector<at::Tensor> params;
  for (const auto& [fqn, p] : model.parameters()) {
    opt.add_parameter(fqn, p, uses_weight_decay(fqn, p.dim()));
    params.push_back(p);
  }
  at::Tensor tokens = at::randint(0, 64, {4, 17}, at::kLong);
  at::Tensor inputs = tokens.narrow(1, 0, 16), targets = tokens.narrow(1, 1, 16);
  double loss_value = 0;
  for (int step = 0; step < 300; ++step) {
    at::Tensor loss =
        at::cross_entropy_loss(model.forward(inputs).flatten(0, 1), targets.flatten());
    loss.backward();
    clip_grad_norm(params, 1.0);
    opt.step(oc.lr);
    opt.zero_grad();
    loss_value = loss.item<double>();
  }
  EXPECT_LT(loss_value, 0.1);
}

// A job on a synthetic corpus with structure to learn: token t+1 = (3 * t + 1) mod V, with
// a random restart every 16 tokens.
Config synthetic_job(const TempDir& dir) {
  const int64_t vocab = 61;
  std::vector<uint32_t> tokens;
  uint32_t state = 12345, token = 0;
  for (int i = 0; i < 20000; ++i) {
    if (i % 16 == 0) {
      state = state * 1103515245u + 12345u;
      token = (state >> 16) % vocab;
    } else {
      token = (3 * token + 1) % vocab;
    }
    tokens.push_back(token);
  }
  write_token_shard(dir / "train_000000.bin", tokens, vocab);
  write_token_shard(dir / "val_000000.bin",
                    std::vector<uint32_t>(tokens.begin(), tokens.begin() + 2000), vocab);
  Config config;
  config.job.run_dir = dir / "run";
  config.model = testing::micro_model(vocab, 32);
  config.data.train = dir / "train_*.bin";
  config.data.val = dir / "val_*.bin";
  config.data.seq_len = 32;
  config.training.steps = 12;
  config.training.global_batch_size = 8;
  config.training.micro_batch_size = 4;
  config.training.eval_interval = 6;
  config.training.eval_batches = 2;
  config.training.log_interval = 4;
  config.lr_scheduler.warmup_steps = 2;
  config.parallel.threads_per_rank = 1;
  config.checkpoint.enable = false;  // each test trains from scratch in its run_dir
  return config;
}

// The masked loss, summed over the targets the mask keeps, against log-softmax by hand.
TEST(MaskedLoss, SumsTheCrossEntropyOfTheKeptTargetsOnly) {
  ModelConfig c = testing::micro_model(64, 8);
  Llama model(c);
  model.materialize(at::kCPU);
  model.initialize(3);
  TokenBatch b;
  b.batch = 2;
  b.seq_len = 4;
  b.inputs = {1, 5, 9, 13, 2, 4, 8, 16};
  b.targets = {5, 9, 13, 17, 4, 8, 16, 32};
  b.loss_mask = {0, 1, 1, 0, 1, 0, 0, 0};
  EXPECT_EQ(b.target_count(), 3);
  at::NoGradGuard no_grad;
  const at::Tensor logits =
      model.forward(at::tensor(b.inputs, at::kLong).view({2, 4})).to(at::kDouble).contiguous();
  const auto l = logits.accessor<double, 3>();
  double expected = 0.0, all = 0.0;
  for (int64_t row = 0; row < 2; ++row) {
    for (int64_t t = 0; t < 4; ++t) {
      double max = l[row][t][0];
      for (int64_t v = 1; v < 64; ++v) max = std::max(max, l[row][t][v]);
      double sum = 0.0;
      for (int64_t v = 0; v < 64; ++v) sum += std::exp(l[row][t][v] - max);
      const double nll = max + std::log(sum) - l[row][t][b.targets[row * 4 + t]];
      all += nll;
      if (b.loss_mask[row * 4 + t]) expected += nll;
    }
  }
  EXPECT_NEAR(batch_loss_sum(model, b).item<double>(), expected, 1e-5 * expected);
  // Without a mask, every target counts: the mean times the count.
  b.loss_mask.clear();
  EXPECT_EQ(b.target_count(), 8);
  EXPECT_NEAR(batch_loss_sum(model, b).item<double>(), all, 1e-5 * all);
  EXPECT_NEAR(batch_loss(model, b).item<double>(), all / 8, 1e-5 * all / 8);
}

TEST(Training, SameSeedGivesBitIdenticalLosses) {
  TempDir dir;
  Config config = synthetic_job(dir);
  const TrainSummary first = train(config, *MpiEnvironment::group);
  const TrainSummary second = train(config, *MpiEnvironment::group);
  ASSERT_EQ(first.losses.size(), 12u);
  EXPECT_EQ(first.losses, second.losses);  // bit for bit
  EXPECT_EQ(first.val_losses, second.val_losses);

  config.job.seed += 1;
  const TrainSummary other = train(config, *MpiEnvironment::group);
  EXPECT_NE(first.losses, other.losses);
}

TEST(Training, WritesResolvedConfigMetricsAndSamples) {
  TempDir dir;
  Config config = synthetic_job(dir);
  train(config, *MpiEnvironment::group);
  const fs::path run = dir.path() / "run";
  ASSERT_TRUE(fs::exists(run / "config.yaml"));
  std::ifstream in(run / "metrics.jsonl");
  std::string line;
  std::vector<nlohmann::json> steps, evals;
  while (std::getline(in, line)) {
    nlohmann::json row = nlohmann::json::parse(line);
    (row.contains("val_loss") ? evals : steps).push_back(row);
  }
  ASSERT_EQ(steps.size(), 4u);  // steps 1, 4, 8, 12
  for (const char* key :
       {"step", "loss", "grad_norm", "lr", "tokens_per_s", "mfu", "step_ms", "mem_mb", "eta_s"}) {
    EXPECT_TRUE(steps.back().contains(key)) << key;
  }
  EXPECT_EQ(steps.back()["step"], 12);
  ASSERT_EQ(evals.size(), 2u);
  EXPECT_EQ(evals[1]["step"], 12);
  EXPECT_TRUE(fs::file_size(run / "samples.txt") > 0);
}

TEST(Training, LossDecreasesOnRealText) {
  TempDir dir;
  PrepareDataOptions prep;
  prep.inputs = {"/usr/share/games/fortunes/fortunes", "/usr/share/games/fortunes/literature"};
  prep.out_dir = dir / "data";
  prep.vocab_size = 384;
  prep.separator = "%";
  prep.val_fraction = 0.1;
  const PrepareDataResult data = prepare_data(prep);

  Config config;
  config.job.run_dir = dir / "run";
  config.model = testing::micro_model(384, 32);
  config.model.dim = 64;
  config.model.max_seq_len = 64;
  config.data.train = dir / "data/train_*.bin";
  config.data.val = dir / "data/val_*.bin";
  config.data.tokenizer = data.tokenizer_path;
  config.data.seq_len = 64;
  config.training.steps = 150;
  config.training.global_batch_size = 16;
  config.training.micro_batch_size = 16;
  config.training.eval_interval = 10;
  config.training.eval_batches = 4;
  config.training.log_interval = 50;
  config.lr_scheduler.warmup_steps = 10;
  config.parallel.threads_per_rank = 2;
  const TrainSummary summary = train(config, *MpiEnvironment::group);
  ASSERT_GE(summary.val_losses.size(), 2u);
  const double first = summary.val_losses.front().second, last = summary.val_losses.back().second;
  EXPECT_LT(last, first - 0.5);
  // Below what a unigram model of the data can do: the model uses context.
  EXPECT_LT(last, data.unigram_entropy_nats);
}

}  // namespace
}  // namespace strata

namespace {

TEST(BlasKernels, DescribesTheLibrary) {
  const std::string text = strata::blas_description();
  // The PyTorch wheel's LibTorch links MKL and exports its version query and sgemm_.
  EXPECT_NE(text.find("Math Kernel Library"), std::string::npos) << text;
  EXPECT_NE(text.find("(LibTorch's)"), std::string::npos) << text;
}

}  // namespace
