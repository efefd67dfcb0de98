// Resharding under mpirun: `save DIR LAYOUT` writes the training state of the micro model
// (parameters from seed 11, AdamW moments set to elementwise functions of the parameters) on
// however many ranks it runs, once synchronously and once asynchronously; `load DIR LAYOUT`
// loads DIR's checkpoint on however many ranks it runs and checks that the gathered parameters
// and moments are bit-identical to what was saved, then trains one step. LAYOUT: fsdp |
// replicated | fsdp-tied | hsdpK (hybrid sharding: shard groups of K ranks, each replica
// saving its part of the shard). tests/checkpoint/reshard.sh runs every save/load world-size
// pair.
#include <ATen/ATen.h>
#include <fmt/format.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>

#include "checkpoint/checkpoint_manager.h"
#include "parallel/communicator.h"
#include "parallel/process_group.h"
#include "tests/common/micro_model.h"
#include "trainer/model/llama.h"
#include "trainer/optim/adamw.h"
#include "trainer/model/sharded_llama.h"
#include "trainer/state_pieces.h"

namespace strata {
namespace {

constexpr uint64_t kSeed = 11;

// The moments the saved state holds: elementwise functions of the parameter values, so any
// layout can recompute them from its own parameters.
at::Tensor expected_exp_avg(const at::Tensor& p) {
  return at::sin(p * 3.0);
}
at::Tensor expected_exp_avg_sq(const at::Tensor& p) {
  return p * p + 0.5;
}

struct State {
  int shard_size = 0;  // hsdpK: K
  std::unique_ptr<Communicator> shard_comm, replica_comm;
  ModelConfig config;
  std::unique_ptr<Llama> plain;
  std::unique_ptr<ShardedLlama> sharded;
  std::unique_ptr<AdamW> optimizer;
  std::vector<at::Tensor> params;
};

State build(const std::string& layout, Communicator& comm) {
  State s;
  s.config = testing::micro_model(97, 16, layout == "fsdp-tied");
  s.optimizer = std::make_unique<AdamW>(OptimizerConfig{});
  if (layout.rfind("hsdp", 0) == 0) {
    s.shard_size = std::stoi(layout.substr(4));
    if (comm.world_size() % s.shard_size != 0) {
      throw std::runtime_error(
          fmt::format("{} needs a multiple of {} ranks", layout, s.shard_size));
    }
    const int rank = comm.rank();
    s.shard_comm = comm.split(rank / s.shard_size, rank % s.shard_size);
    s.replica_comm = comm.split(rank % s.shard_size, rank / s.shard_size);
    s.sharded = std::make_unique<ShardedLlama>(s.config, *s.shard_comm, /*recompute=*/true);
    s.params = s.sharded->add_to_optimizer(*s.optimizer);
  } else if (layout != "replicated" && comm.world_size() > 1) {
    s.sharded = std::make_unique<ShardedLlama>(s.config, comm, /*recompute=*/true);
    s.params = s.sharded->add_to_optimizer(*s.optimizer);
  } else {
    s.plain = std::make_unique<Llama>(s.config);
    s.plain->materialize(at::kCPU);
    for (const auto& [fqn, p] : s.plain->parameters()) {
      s.optimizer->add_parameter(fqn, p, uses_weight_decay(fqn, p.dim()));
      s.params.push_back(p);
    }
  }
  return s;
}

std::vector<TensorPiece> pieces(State& s, Communicator& comm, PieceUse use) {
  if (!s.sharded)
    return state_pieces(*s.plain, s.optimizer.get(), comm.rank(), comm.world_size(), use);
  std::vector<TensorPiece> out = state_pieces(*s.sharded, s.optimizer.get());
  if (s.replica_comm && use == PieceUse::kSave) {
    out = share_of_pieces(std::move(out), s.replica_comm->rank(), s.replica_comm->world_size());
  }
  return out;
}

// Parameters and moments at full size, by key (FSDP: gathered from the shards).
std::map<std::string, at::Tensor> full_state(State& s) {
  std::map<std::string, at::Tensor> out;
  const StateDict moments = s.optimizer->state();
  if (s.plain) {
    for (const auto& [fqn, p] : s.plain->parameters()) {
      out[fqn] = p.detach().clone();
      out["optimizer." + fqn + ".exp_avg"] = moments.at(fqn + ".exp_avg").clone();
      out["optimizer." + fqn + ".exp_avg_sq"] = moments.at(fqn + ".exp_avg_sq").clone();
    }
    return out;
  }
  for (const auto& unit : s.sharded->units()) {
    auto gather = [&](const at::Tensor& shard) {
      at::Tensor full = at::empty({unit->padded_numel()}, at::kFloat);
      unit->comm().all_gather(shard.detach().contiguous(), full);
      return unit->views(full);
    };
    const auto params = gather(unit->shard());
    const auto m1 = gather(moments.at(unit->name() + ".exp_avg"));
    const auto m2 = gather(moments.at(unit->name() + ".exp_avg_sq"));
    for (size_t i = 0; i < params.size(); ++i) {
      const std::string& fqn = unit->params()[i].fqn;
      out[fqn] = params[i].clone();
      out["optimizer." + fqn + ".exp_avg"] = m1[i].clone();
      out["optimizer." + fqn + ".exp_avg_sq"] = m2[i].clone();
    }
  }
  return out;
}

int run(const std::string& mode, const std::string& dir, const std::string& layout,
        const ProcessGroup& group) {
  std::unique_ptr<Communicator> comm = make_mpi_communicator(group);
  State s = build(layout, *comm);
  auto log = [&](const std::string& line) {
    if (group.is_main()) fmt::print("{}\n", line);
  };
  if (mode == "save") {
    s.sharded ? s.sharded->initialize(kSeed) : s.plain->initialize(kSeed);
    {
      at::NoGradGuard no_grad;
      const StateDict moments = s.optimizer->state();
      for (const auto& [key, m] : moments) {
        // The slot's parameter is the tensor of the same slot order; recover it by name.
        const std::string slot = key.substr(0, key.rfind('.'));
        at::Tensor param;
        if (s.sharded) {
          for (const auto& unit : s.sharded->units()) {
            if (unit->name() == slot) param = unit->shard().detach();
          }
        } else {
          param = s.plain->parameters().at(slot).detach();
        }
        const bool second = key.size() > 7 && key.compare(key.size() - 7, 7, "_avg_sq") == 0;
        m.copy_(second ? expected_exp_avg_sq(param) : expected_exp_avg(param));
      }
      s.optimizer->set_steps_taken(7);
    }
    for (const bool async : {false, true}) {
      CheckpointOptions options{(std::filesystem::path(dir) / (async ? "async" : "sync")).string(),
                                async, 0};
      CheckpointManager manager(options, *comm, log);
      SaveRequest request;
      request.step = 7;
      request.pieces = pieces(s, *comm, PieceUse::kSave);
      request.train_state = {{"step", 7}};
      manager.save(std::move(request));
      manager.finish();
    }
    return 0;
  }

  // load: nothing initialised; everything must come from the checkpoint.
  const std::string step_dir = *find_checkpoint((std::filesystem::path(dir) / "sync").string());
  std::vector<TensorPiece> want = pieces(s, *comm, PieceUse::kLoad);
  run_on_all_ranks<CheckpointError>(*comm, "loading " + step_dir, [&] {
    at::NoGradGuard no_grad;
    CheckpointReader(step_dir).load(want);
  });
  const std::map<std::string, at::Tensor> got = full_state(s);
  Llama reference(s.config);
  reference.materialize(at::kCPU);
  reference.initialize(kSeed);
  int mismatches = 0, checked = 0;
  for (const auto& [fqn, p] : reference.parameters()) {
    const at::Tensor expected[3] = {p, expected_exp_avg(p), expected_exp_avg_sq(p)};
    const std::string keys[3] = {fqn, "optimizer." + fqn + ".exp_avg",
                                 "optimizer." + fqn + ".exp_avg_sq"};
    for (int i = 0; i < 3; ++i) {
      ++checked;
      if (!at::equal(got.at(keys[i]), expected[i])) {
        ++mismatches;
        fmt::print(stderr, "[rank {}] {} differs from the saved value\n", comm->rank(), keys[i]);
      }
    }
  }
  // The async save holds the same bytes as the sync one.
  const std::string async_dir = *find_checkpoint((std::filesystem::path(dir) / "async").string());
  const CheckpointReader sync_reader(step_dir), async_reader(async_dir);
  if (sync_reader.metadata().at("files") != async_reader.metadata().at("files")) {
    ++mismatches;
    fmt::print(stderr, "async checkpoint files differ from the sync ones\n");
  }
  // Training continues: one AdamW step on the loaded state.
  s.optimizer->set_steps_taken(7);
  const LanguageModel& model = s.sharded ? static_cast<const LanguageModel&>(*s.sharded) : *s.plain;
  at::Tensor tokens = at::arange(32, at::kLong).remainder(97).view({2, 16});
  at::Tensor logits = model.forward(tokens);
  at::Tensor loss = at::cross_entropy_loss(logits.flatten(0, 1), tokens.roll(-1, 1).flatten());
  loss.backward();
  if (!s.sharded && comm->world_size() > 1) {
    for (at::Tensor& p : s.params) comm->all_reduce(p.mutable_grad(), ReduceOp::kAvg);
  }
  if (s.replica_comm) {
    for (at::Tensor& p : s.params) {
      if (p.numel() > 0) s.replica_comm->all_reduce(p.mutable_grad(), ReduceOp::kAvg);
    }
  }
  s.optimizer->step(1e-3);
  at::Tensor flags = at::tensor({static_cast<int32_t>(mismatches),
                                 static_cast<int32_t>(!std::isfinite(loss.item<double>()))});
  comm->all_reduce(flags, ReduceOp::kMax);
  if (flags[0].item<int32_t>() != 0 || flags[1].item<int32_t>() != 0) {
    log(fmt::format("reshard: FAILED loading {} on {} ranks as {} (saved on {} ranks) ({})",
                    step_dir, comm->world_size(), layout,
                    sync_reader.metadata().at("world_size").get<int>(),
                    flags[1].item<int32_t>() ? "non-finite loss" : "values differ"));
    return 1;
  }
  log(
      fmt::format("reshard: {} saved on {} rank(s) loaded on {} rank(s) ({}): {} tensors "
                  "bit-identical, async files == sync files, next step loss {:.4f}",
                  step_dir, sync_reader.metadata().at("world_size").get<int>(), comm->world_size(),
                  layout, checked, loss.item<double>()));
  return 0;
}

}  // namespace
}  // namespace strata

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s save|load DIR fsdp|replicated|fsdp-tied|hsdpK\n", argv[0]);
    return 2;
  }
  strata::ProcessGroup group(&argc, &argv);
  try {
    return strata::run(argv[1], argv[2], argv[3], group);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[rank %d] error: %s\n", group.rank(), e.what());
    return 1;
  }
}
