// ShardedLlama against the whole model, on however many ranks this program runs (ctest runs
// it alone and under mpirun -np 2, 3 and 4): identical initial weights, identical logits,
// and the same weights after AdamW steps where each rank trains on its slice of the batch.
#include <gtest/gtest.h>

#include <set>
#include <tuple>

#include "parallel/communicator.h"
#include "tests/common/mpi_environment.h"
#include "tests/common/micro_model.h"
#include "trainer/model/converters/converter.h"
#include "trainer/model/sharded_llama.h"

namespace strata {
namespace {

using testing::MpiEnvironment;

// The global batch of `step` (the same on every rank): random tokens; from step 2 on, the rows
// hold packed documents, so the document mask must reach every block, in recomputation too.
struct StepBatch {
  StepBatch(int step, int64_t vocab_size, int64_t batch) : step(step) {
    at::manual_seed(100 + step);
    const at::Tensor tokens = at::randint(0, vocab_size, {batch, 11}, at::kLong);
    inputs = tokens.narrow(1, 0, 10);
    targets = tokens.narrow(1, 1, 10);
    doc_start = at::rand({batch, 10}).lt(0.2).to(at::kByte);
    doc_start.select(1, 0).fill_(1);
  }
  // The mean loss of `model` over rows [first, first + rows).
  at::Tensor loss(const LanguageModel& model, int64_t first, int64_t rows) const {
    const DocumentMask documents = document_mask(doc_start.narrow(0, first, rows));
    const at::Tensor logits =
        model.forward(inputs.narrow(0, first, rows), step > 1 ? &documents : nullptr);
    return at::cross_entropy_loss(logits.flatten(0, 1), targets.narrow(0, first, rows).flatten());
  }
  int step;
  at::Tensor inputs, targets, doc_start;
};

class ShardedLlamaTest : public ::testing::TestWithParam<std::tuple<bool, bool>> {
 protected:
  void SetUp() override { comm = make_mpi_communicator(*MpiEnvironment::group); }
  bool tied() const { return std::get<0>(GetParam()); }
  bool recompute() const { return std::get<1>(GetParam()); }
  std::unique_ptr<Communicator> comm;
};

TEST_P(ShardedLlamaTest, StartsFromTheUnshardedWeightsAndGivesTheSameLogits) {
  const ModelConfig c = testing::micro_model(67, 16, tied());
  Llama whole(c);
  whole.materialize(at::kCPU);
  whole.initialize(21);
  ShardedLlama sharded(c, *comm, recompute());
  sharded.initialize(21);
  const StateDict gathered = sharded.gather_parameters();
  ASSERT_EQ(gathered.keys(), whole.parameters().keys());
  for (const auto& [fqn, t] : whole.parameters())
    EXPECT_TRUE(at::equal(gathered.at(fqn), t)) << fqn;
  for (const auto& unit : sharded.units()) {
    EXPECT_EQ(unit->shard_numel(), (unit->numel() + comm->world_size() - 1) / comm->world_size());
  }
  at::NoGradGuard no_grad;
  at::manual_seed(3);
  at::Tensor tokens = at::randint(0, c.vocab_size, {2, 9}, at::kLong);
  EXPECT_TRUE(at::allclose(sharded.forward(tokens), whole.forward(tokens), 1e-5, 1e-6));
}

TEST_P(ShardedLlamaTest, TrainingStepsMatchTheUnshardedModel) {
  const ModelConfig c = testing::micro_model(67, 16, tied());
  const int world = comm->world_size(), rank = comm->rank();
  OptimizerConfig oc;
  oc.lr = 1e-2;
  Llama whole(c);
  whole.materialize(at::kCPU);
  whole.initialize(5);
  AdamW whole_opt(oc);
  std::vector<at::Tensor> whole_params;
  for (const auto& [fqn, p] : whole.parameters()) {
    whole_opt.add_parameter(fqn, p, uses_weight_decay(fqn, p.dim()));
    whole_params.push_back(p);
  }
  ShardedLlama sharded(c, *comm, recompute());
  sharded.initialize(5);
  AdamW sharded_opt(oc);
  const std::vector<at::Tensor> shards = sharded.add_to_optimizer(sharded_opt);

  const int64_t batch = 12;  // divisible by 1..4 ranks
  for (int step = 1; step <= 3; ++step) {
    const StepBatch data(step, c.vocab_size, batch);
    data.loss(whole, 0, batch).backward();
    clip_grad_norm(whole_params, 0.5);
    whole_opt.step(oc.lr);
    whole_opt.zero_grad();

    const int64_t per_rank = batch / world;
    data.loss(sharded, rank * per_rank, per_rank).backward();
    clip_grad_norm(shards, 0.5, comm.get());
    sharded_opt.step(oc.lr);
    sharded_opt.zero_grad();
  }
  // Summation order differs (per-rank means, reduce-scatter, and the BLAS's blocking for
  // each batch size); Adam divides by sqrt(v), which magnifies that noise for near-zero
  // gradients, so compare to 1/100 of the total update (3 steps x lr 1e-2 = 3e-2 at most per
  // element). Measured with LibTorch 2.11's MKL: at most 1.1e-4 (3 ranks, tied embeddings);
  // without the document mask on the sharded side the difference is 3e-2.
  const StateDict gathered = sharded.gather_parameters();
  for (const auto& [fqn, t] : whole.parameters()) {
    EXPECT_TRUE(at::allclose(gathered.at(fqn), t, 1e-4, 3e-4))
        << fqn << " max diff " << (gathered.at(fqn) - t).abs().max().item<double>();
  }
}

// LoRA under FSDP: the base weights sit in each unit's frozen buffer (gathered, never
// updated), A/B are sharded and trained; the result matches the whole model's.
TEST_P(ShardedLlamaTest, LoraTrainsOnlyTheAdaptersAndMatchesTheUnshardedModel) {
  const ModelConfig c = testing::micro_model(67, 16, tied());
  ConverterConfig lora;
  lora.type = "lora";
  lora.rank = 4;
  lora.alpha = 8;
  lora.target_modules = {"wq", "wv", "w2"};
  const Converters converters({lora});
  const int world = comm->world_size(), rank = comm->rank();
  OptimizerConfig oc;
  oc.lr = 1e-2;
  Llama whole(c, &converters);
  whole.materialize(at::kCPU);
  whole.initialize(5);
  {  // B = 0 leaves nothing to learn from for A; start B away from zero
    at::NoGradGuard no_grad;
    for (const auto& [fqn, p] : whole.parameters()) {
      if (fqn.size() > 7 && fqn.compare(fqn.size() - 7, 7, ".lora_b") == 0) p.normal_(0.0, 0.02);
    }
  }
  const StateDict initial = [&] {
    StateDict copy;
    for (const auto& [fqn, p] : whole.parameters()) copy.insert(fqn, p.detach().clone());
    return copy;
  }();
  AdamW whole_opt(oc);
  std::vector<at::Tensor> whole_params;
  for (const auto& [fqn, p] : whole.parameters()) {
    if (!whole.trainable(fqn)) continue;
    whole_opt.add_parameter(fqn, p, uses_weight_decay(fqn, p.dim()));
    whole_params.push_back(p);
  }
  ASSERT_EQ(whole_params.size(), 2u * 3u * static_cast<size_t>(c.n_layers));
  ShardedLlama sharded(c, *comm, recompute(), &converters);
  std::set<std::string> loaded;
  for (const auto& unit : sharded.units()) {
    for (size_t i = 0; i < unit->params().size(); ++i) {
      unit->load_param(i, initial.at(unit->params()[i].fqn));
      loaded.insert(unit->params()[i].fqn);
    }
  }
  EXPECT_TRUE(sharded.initialize(5, loaded).empty());
  AdamW sharded_opt(oc);
  const std::vector<at::Tensor> shards = sharded.add_to_optimizer(sharded_opt);
  EXPECT_EQ(sharded_opt.state().size(), 2u * static_cast<size_t>(c.n_layers));  // LoRA units only

  const int64_t batch = 12;
  for (int step = 1; step <= 3; ++step) {
    const StepBatch data(step, c.vocab_size, batch);
    data.loss(whole, 0, batch).backward();
    whole_opt.step(oc.lr);
    whole_opt.zero_grad();
    const int64_t per_rank = batch / world;
    data.loss(sharded, rank * per_rank, per_rank).backward();
    sharded_opt.step(oc.lr);
    sharded_opt.zero_grad();
  }
  const StateDict gathered = sharded.gather_parameters();
  for (const auto& [fqn, t] : whole.parameters()) {
    if (converters.owned(fqn)) {
      EXPECT_FALSE(at::equal(t, initial.at(fqn))) << fqn << " did not train";
      EXPECT_TRUE(at::allclose(gathered.at(fqn), t, 1e-4, 3e-5))
          << fqn << " max diff " << (gathered.at(fqn) - t).abs().max().item<double>();
    } else {  // frozen: bit-identical, whole and sharded
      EXPECT_TRUE(at::equal(t, initial.at(fqn))) << fqn << " changed";
      EXPECT_TRUE(at::equal(gathered.at(fqn), initial.at(fqn))) << fqn << " changed when sharded";
      EXPECT_FALSE(t.requires_grad()) << fqn;
    }
  }
}

// LoRA dropout under activation checkpointing: the recomputation in backward replays the
// forward pass's dropout masks, so gradients equal those of the kept graph.
TEST_P(ShardedLlamaTest, LoraDropoutIsReplayedWhenUnitsRecompute) {
  if (recompute()) GTEST_SKIP() << "compares both modes in one run";
  const ModelConfig c = testing::micro_model(67, 16, tied());
  ConverterConfig lora;
  lora.type = "lora";
  lora.rank = 4;
  lora.dropout = 0.3;
  lora.target_modules = {"wq", "wo", "w1"};
  const Converters converters({lora});
  std::vector<at::Tensor> grads[2];
  for (int mode = 0; mode < 2; ++mode) {
    ShardedLlama sharded(c, *comm, /*recompute=*/mode == 1, &converters);
    sharded.initialize(9);
    at::manual_seed(5);
    for (const auto& unit : sharded.units()) {
      at::NoGradGuard no_grad;
      if (unit->shard_numel() > 0) unit->shard().normal_(0.0, 0.05);  // B != 0
    }
    at::manual_seed(77);
    at::Tensor tokens = at::randint(0, c.vocab_size, {4, 11}, at::kLong);
    at::cross_entropy_loss(sharded.forward(tokens.narrow(1, 0, 10)).flatten(0, 1),
                           tokens.narrow(1, 1, 10).flatten())
        .backward();
    for (const auto& unit : sharded.units()) {
      if (unit->shard_numel() > 0) grads[mode].push_back(unit->shard().grad().clone());
    }
  }
  ASSERT_EQ(grads[0].size(), grads[1].size());
  for (size_t i = 0; i < grads[0].size(); ++i) {
    EXPECT_TRUE(at::allclose(grads[0][i], grads[1][i], 1e-5, 1e-7))
        << "unit " << i << " max diff " << (grads[0][i] - grads[1][i]).abs().max().item<double>();
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, ShardedLlamaTest,
                         ::testing::Combine(::testing::Bool(), ::testing::Bool()),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param) ? "tied" : "untied") +
                                  (std::get<1>(info.param) ? "_recompute" : "_keep");
                         });

}  // namespace
}  // namespace strata
