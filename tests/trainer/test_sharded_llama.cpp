// ShardedLlama against the whole model, on however many ranks this program runs (ctest runs
// it alone and under mpirun -np 2, 3 and 4): identical initial weights, identical logits,
// and the same weights after AdamW steps where each rank trains on its slice of the batch;
// bf16 mixed precision against fp32 and against one rank; the order of the prefetches, and
// results that prefetch and an asynchronous backend leave unchanged. The GPU case runs only
// where each rank has a GPU.
#include <gtest/gtest.h>

#include <functional>
#include <limits>
#include <map>
#include <set>
#include <tuple>

#include "parallel/communicator.h"
#include "parallel/nccl_communicator.h"
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
        model.forward(inputs.narrow(0, first, rows), step > 1 ? &documents : nullptr)
            .to(at::kFloat);
    return at::cross_entropy_loss(logits.flatten(0, 1), targets.narrow(0, first, rows).flatten());
  }
  int step;
  at::Tensor inputs, targets, doc_start;
};

// An asynchronous backend over MPI, to exercise the paths NCCL takes on a machine without a
// GPU: the *_async collectives fill their output with NaN and run only when their work is
// waited for (every rank waits in the same order), so reading a result before its wait, or
// missing a wait, shows in the results.
class DeferredCommunicator final : public Communicator {
  class Work final : public CommWork {
   public:
    explicit Work(std::function<void()> run) : run_(std::move(run)) {}
    void wait() override {
      if (run_) std::exchange(run_, nullptr)();
    }

   private:
    std::function<void()> run_;
  };

 public:
  explicit DeferredCommunicator(Communicator& inner) : inner_(inner) {}
  int rank() const override { return inner_.rank(); }
  int world_size() const override { return inner_.world_size(); }
  void all_reduce(at::Tensor& t, ReduceOp op) override { inner_.all_reduce(t, op); }
  void all_gather(const at::Tensor& in, at::Tensor& out) override { inner_.all_gather(in, out); }
  void reduce_scatter(const at::Tensor& in, at::Tensor& out, ReduceOp op) override {
    inner_.reduce_scatter(in, out, op);
  }
  std::unique_ptr<CommWork> all_gather_async(const at::Tensor& in, at::Tensor& out) override {
    out.fill_(std::numeric_limits<float>::quiet_NaN());
    return std::make_unique<Work>([this, in, out]() mutable { inner_.all_gather(in, out); });
  }
  std::unique_ptr<CommWork> reduce_scatter_async(const at::Tensor& in, at::Tensor& out,
                                                 ReduceOp op) override {
    out.fill_(std::numeric_limits<float>::quiet_NaN());
    return std::make_unique<Work>(
        [this, in, out, op]() mutable { inner_.reduce_scatter(in, out, op); });
  }
  void broadcast(at::Tensor& t, int root) override { inner_.broadcast(t, root); }
  void barrier() override { inner_.barrier(); }
  std::optional<RankFailure> agree(bool ok, const std::string& message) override {
    return inner_.agree(ok, message);
  }
  std::vector<std::string> all_gather_strings(const std::string& text) override {
    return inner_.all_gather_strings(text);
  }
  std::string broadcast_string(const std::string& text, int root) override {
    return inner_.broadcast_string(text, root);
  }
  std::unique_ptr<Communicator> split(int color, int key) override {
    return inner_.split(color, key);
  }
  CommStats stats() const override { return inner_.stats(); }

 private:
  Communicator& inner_;
};

// The full gradient of every trainable parameter, by FQN (a collective).
std::map<std::string, at::Tensor> full_gradients(const ShardedLlama& model) {
  std::map<std::string, at::Tensor> out;
  for (const auto& unit : model.units()) {
    if (unit->shard_numel() == 0) continue;
    at::Tensor grad = unit->shard().grad();
    if (!grad.defined()) grad = at::zeros_like(unit->shard());
    at::Tensor full = at::empty({unit->padded_numel()}, grad.options());
    unit->comm().all_gather(grad.detach().contiguous(), full);
    for (size_t i = 0; i < unit->params().size(); ++i) {
      if (!unit->trainable(i)) continue;
      out[unit->params()[i].fqn] =
          full.narrow(0, unit->offset(i), unit->numel_of(i)).view(unit->params()[i].shape);
    }
  }
  return out;
}

// |a - b| / |b| over the whole tensor (the Frobenius norms).
double relative_error(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).norm().item<double>() /
         std::max(b.to(at::kDouble).norm().item<double>(), 1e-30);
}

// "P:unit" for a prefetch, "D:unit" for a gather on demand.
std::vector<std::string> describe(const std::vector<GatherEvent>& trace) {
  std::vector<std::string> out;
  for (const GatherEvent& e : trace) out.push_back((e.prefetch ? "P:" : "D:") + e.unit);
  return out;
}

// LoRA with dropout on three block linears: what a recomputation must replay.
ConverterConfig lora_with_dropout() {
  ConverterConfig lora;
  lora.type = "lora";
  lora.rank = 4;
  lora.dropout = 0.3;
  lora.target_modules = {"wq", "wo", "w1"};
  return lora;
}

FsdpOptions mixed_precision(at::ScalarType param_dtype, at::ScalarType reduce_dtype,
                            bool prefetch = true) {
  FsdpOptions options;
  options.param_dtype = param_dtype;
  options.reduce_dtype = reduce_dtype;
  options.prefetch = prefetch;
  return options;
}

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
  const Converters converters({lora_with_dropout()});
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

// Prefetch: the order of the gathers in forward and backward (each run prefetches the next;
// with recompute each backward prefetches the unit whose backward comes next, and only when
// that one will gather), and the same loss and gradients, bit for bit, with prefetch off and
// with an asynchronous backend.
TEST_P(ShardedLlamaTest, PrefetchOverlapsTheNextGatherAndChangesNoResult) {
  const ModelConfig c = testing::micro_model(67, 16, tied());
  const StepBatch data(2, c.vocab_size, 4);  // packed documents: the mask reaches recomputation
  struct Result {
    double loss = 0;
    std::map<std::string, at::Tensor> grads;
    std::vector<std::string> forward, backward;
  };
  const auto train = [&](Communicator& comm, bool prefetch, const Converters* converters) {
    ShardedLlama model(c, comm, recompute(), converters,
                       mixed_precision(at::kFloat, at::kFloat, prefetch));
    model.initialize(13);
    std::vector<GatherEvent> trace;
    set_gather_trace(&trace);
    Result r;
    at::Tensor loss = data.loss(model, 0, 4);
    r.forward = describe(trace);
    trace.clear();
    loss.backward();
    model.finish_gradients();
    set_gather_trace(nullptr);
    r.backward = describe(trace);
    r.loss = loss.item<double>();
    r.grads = full_gradients(model);
    for (const auto& unit : model.units()) EXPECT_FALSE(unit->prefetch_pending()) << unit->name();
    return r;
  };
  const std::string head = tied() ? "tok_embeddings" : "head";
  std::vector<std::string> forward = {"D:tok_embeddings", "P:layers.0", "P:layers.1", "P:" + head};
  std::vector<std::string> backward;
  if (recompute()) backward = {"D:" + head, "P:layers.1", "P:layers.0", "P:tok_embeddings"};
  const Result on = train(*comm, true, nullptr);
  EXPECT_EQ(on.forward, forward);
  EXPECT_EQ(on.backward, backward);

  const Result off = train(*comm, false, nullptr);
  for (auto& e : forward) e[0] = 'D';
  for (auto& e : backward) e[0] = 'D';
  EXPECT_EQ(off.forward, forward);
  EXPECT_EQ(off.backward, backward);
  DeferredCommunicator deferred(*comm);
  const Result async = train(deferred, true, nullptr);
  EXPECT_EQ(async.forward, on.forward);
  EXPECT_EQ(async.backward, on.backward);
  for (const Result* other : {&off, &async}) {
    EXPECT_EQ(other->loss, on.loss);
    ASSERT_EQ(other->grads.size(), on.grads.size());
    for (const auto& [fqn, g] : on.grads) EXPECT_TRUE(at::equal(other->grads.at(fqn), g)) << fqn;
  }

  // LoRA on the blocks: the embedding trains nothing and takes no input gradient, so its
  // backward gathers nothing and nobody prefetches it there.
  ConverterConfig lora;
  lora.type = "lora";
  lora.rank = 2;
  lora.target_modules = {"wq", "w2"};
  const Converters converters({lora});
  const Result adapters = train(*comm, true, &converters);
  EXPECT_EQ(adapters.forward, on.forward);
  if (recompute()) backward = {"D:" + head, "P:layers.1", "P:layers.0"};
  EXPECT_EQ(adapters.backward, backward);
}

// Mixed precision: bf16 compute with fp32 master shards and an fp32 reduction against the
// whole fp32 model, each rank on its slice of the batch.
TEST_P(ShardedLlamaTest, Bf16ComputeStaysCloseToTheFp32Model) {
  const ModelConfig c = testing::micro_model(67, 16, tied());
  const int world = comm->world_size(), rank = comm->rank();
  Llama whole(c);
  whole.materialize(at::kCPU);
  whole.initialize(5);
  ShardedLlama sharded(c, *comm, recompute(), nullptr, mixed_precision(at::kBFloat16, at::kFloat));
  sharded.initialize(5);
  const StateDict gathered = sharded.gather_parameters();  // the fp32 masters
  for (const auto& [fqn, t] : whole.parameters()) {
    ASSERT_EQ(gathered.at(fqn).scalar_type(), at::kFloat) << fqn;
    EXPECT_TRUE(at::equal(gathered.at(fqn), t)) << fqn;
  }
  const int64_t batch = 12, per_rank = batch / world;
  const StepBatch data(2, c.vocab_size, batch);
  const at::Tensor whole_loss = data.loss(whole, 0, batch);
  whole_loss.backward();
  at::Tensor loss = data.loss(sharded, rank * per_rank, per_rank);
  loss.backward();
  sharded.finish_gradients();
  at::Tensor mean = loss.detach().clone();
  comm->all_reduce(mean, ReduceOp::kAvg);
  const double loss_error = relative_error(mean, whole_loss);
  double grad_error = 0;
  for (const auto& [fqn, g] : full_gradients(sharded)) {
    grad_error = std::max(grad_error, relative_error(g, whole.parameters().at(fqn).grad()));
  }
  for (const auto& unit : sharded.units()) {
    EXPECT_EQ(unit->shard().scalar_type(), at::kFloat);
    EXPECT_EQ(unit->shard().grad().scalar_type(), at::kFloat);
  }
  // Relative errors (Frobenius norm of the difference over that of the fp32 gradient, the
  // largest over the parameters). Measured on 1..4 ranks: loss at most 1.8e-4 (tied),
  // gradients at most 9.9e-3; fp32 compute would be ~1e-6, so bf16 must show.
  EXPECT_LT(loss_error, 1e-3);
  EXPECT_LT(grad_error, 3e-2);
  EXPECT_GT(grad_error, 1e-4) << "the bodies did not compute in bf16";
}

// bf16 compute on N ranks (each on its slice of the batch) against the same options on one
// rank (a world of one, the whole batch); and the reduction in bf16 against the one in fp32.
TEST_P(ShardedLlamaTest, Bf16OnManyRanksMatchesOneRankInEitherReduceDtype) {
  const ModelConfig c = testing::micro_model(67, 16, tied());
  const int world = comm->world_size(), rank = comm->rank();
  const std::unique_ptr<Communicator> solo = comm->split(rank, 0);
  const int64_t batch = 12, per_rank = batch / world;
  const StepBatch data(2, c.vocab_size, batch);
  const auto train = [&](Communicator& on, at::ScalarType reduce_dtype, double* loss_out) {
    ShardedLlama model(c, on, recompute(), nullptr, mixed_precision(at::kBFloat16, reduce_dtype));
    model.initialize(5);
    const bool alone = on.world_size() == 1;
    at::Tensor loss = data.loss(model, alone ? 0 : rank * per_rank, alone ? batch : per_rank);
    loss.backward();
    model.finish_gradients();
    for (const auto& unit : model.units()) {
      EXPECT_EQ(unit->shard().scalar_type(), at::kFloat);
      EXPECT_EQ(unit->shard().grad().scalar_type(), at::kFloat);
    }
    at::Tensor mean = loss.detach().clone();
    on.all_reduce(mean, ReduceOp::kAvg);
    *loss_out = mean.item<double>();
    return full_gradients(model);
  };
  double one_loss = 0, many_loss = 0, bf16_loss = 0;
  const auto one = train(*solo, at::kFloat, &one_loss);
  const auto many = train(*comm, at::kFloat, &many_loss);
  const auto bf16 = train(*comm, at::kBFloat16, &bf16_loss);
  double many_error = 0, bf16_error = 0;
  for (const auto& [fqn, g] : one) {
    many_error = std::max(many_error, relative_error(many.at(fqn), g));
    bf16_error = std::max(bf16_error, relative_error(bf16.at(fqn), many.at(fqn)));
  }
  const double loss_error = std::abs(many_loss - one_loss) / one_loss;
  // Measured on 2..4 ranks (1 rank: all exact): loss at most 2.1e-7 relative, gradients at
  // most 9.8e-3 (bf16 rounding of per-rank partial gradients); the bf16 reduction differs from
  // the fp32 one by at most 2.7e-3.
  EXPECT_LT(loss_error, 1e-5);
  EXPECT_LT(many_error, 3e-2);
  EXPECT_EQ(bf16_loss, many_loss);  // forward does not depend on the reduction
  EXPECT_LT(bf16_error, 1e-2);
}

// A prefetch that an in-place change of the shard (an optimizer step) made stale is dropped.
TEST(FsdpUnitTest, StalePrefetchIsGatheredAgain) {
  const std::unique_ptr<Communicator> comm = make_mpi_communicator(*MpiEnvironment::group);
  FsdpUnit unit("u", {{"w", {5}, true}, {"f", {3}, false}}, *comm,
                mixed_precision(at::kBFloat16, at::kFloat));
  unit.load_param(0, at::arange(5, at::kFloat));
  unit.load_param(1, at::arange(3, at::kFloat));
  std::vector<GatherEvent> trace;
  set_gather_trace(&trace);
  unit.prefetch();
  EXPECT_TRUE(unit.prefetch_pending());
  {
    at::NoGradGuard no_grad;
    unit.shard().add_(1);
  }
  auto [trainable, frozen] = unit.gather_for_compute();
  set_gather_trace(nullptr);
  EXPECT_FALSE(unit.prefetch_pending());
  EXPECT_EQ(describe(trace), (std::vector<std::string>{"P:u", "D:u"}));
  EXPECT_EQ(trainable.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::equal(trainable.narrow(0, 0, 5), at::arange(1, 6, at::kBFloat16)));
  EXPECT_TRUE(at::equal(frozen.narrow(0, 0, 3), at::arange(3, at::kBFloat16)));
  EXPECT_EQ(unit.gather(true).scalar_type(), at::kFloat);
}

// ShardedLlama on the GPU: bf16 compute over NCCL with prefetch matches it without; LoRA
// dropout is replayed (the CUDA generator's state) when units recompute.
// Runs where this rank has a GPU of its own (skips otherwise, e.g. on a CPU-only machine).
TEST(ShardedLlamaGpuTest, PrefetchesAndReplaysDropoutOnTheGpu) {
  if (!nccl_compiled() || !at::hasCUDA()) GTEST_SKIP() << "built without CUDA/NCCL";
  if (cuda_device_count() < MpiEnvironment::group->local_world_size())
    GTEST_SKIP() << "needs a GPU per rank";
  const std::unique_ptr<Communicator> comm =
      make_nccl_communicator(*MpiEnvironment::group, MpiEnvironment::group->local_rank());
  const at::Device device(at::kCUDA,
                          static_cast<c10::DeviceIndex>(MpiEnvironment::group->local_rank()));
  const ModelConfig c = testing::micro_model(67, 16, /*tied=*/false);
  const Converters converters({lora_with_dropout()});
  at::manual_seed(77);
  const at::Tensor tokens = at::randint(0, c.vocab_size, {4, 11}, at::kLong).to(device);
  const auto grads = [&](bool recompute, bool prefetch, const Converters* conv, double* loss) {
    FsdpOptions options;
    options.device = device;
    options.param_dtype = at::kBFloat16;
    options.prefetch = prefetch;
    ShardedLlama model(c, *comm, recompute, conv, options);
    model.initialize(9);
    at::manual_seed(5);
    for (const auto& unit : model.units()) {
      at::NoGradGuard no_grad;
      if (unit->shard_numel() > 0) unit->shard().normal_(0.0, 0.05);
    }
    at::manual_seed(6);
    at::Tensor l =
        at::cross_entropy_loss(model.forward(tokens.narrow(1, 0, 10)).flatten(0, 1).to(at::kFloat),
                               tokens.narrow(1, 1, 10).flatten());
    l.backward();
    model.finish_gradients();
    *loss = l.item<double>();
    std::vector<at::Tensor> out;
    for (const auto& unit : model.units()) {
      if (unit->shard_numel() == 0) continue;
      EXPECT_EQ(unit->shard().scalar_type(), at::kFloat);
      out.push_back(unit->shard().grad().cpu());
    }
    return out;
  };
  double loss[4];
  const auto with = grads(true, true, nullptr, &loss[0]);
  const auto without = grads(true, false, nullptr, &loss[1]);
  EXPECT_EQ(loss[0], loss[1]);
  for (size_t i = 0; i < with.size(); ++i)
    EXPECT_TRUE(at::allclose(with[i], without[i], 1e-3, 1e-5)) << i;
  const auto recomputed = grads(true, true, &converters, &loss[2]);
  const auto kept = grads(false, true, &converters, &loss[3]);
  EXPECT_EQ(loss[2], loss[3]);
  for (size_t i = 0; i < kept.size(); ++i)
    EXPECT_TRUE(at::allclose(recomputed[i], kept[i], 1e-2, 1e-4)) << i;
}

INSTANTIATE_TEST_SUITE_P(Layouts, ShardedLlamaTest,
                         ::testing::Combine(::testing::Bool(), ::testing::Bool()),
                         [](const auto& info) {
                           return std::string(std::get<0>(info.param) ? "tied" : "untied") +
                                  (std::get<1>(info.param) ? "_recompute" : "_keep");
                         });

}  // namespace
}  // namespace strata
