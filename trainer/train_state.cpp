// train_state.json, written and read in one place.
#include "trainer/train_state.h"

#include <fmt/format.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "checkpoint/errors.h"
#include "trainer/seed.h"

namespace strata {

TrainState TrainState::fresh(int64_t job_seed) {
  TrainState state;
  state.data_seed = static_cast<uint64_t>(job_seed);
  state.sample_seed = derive_seed(static_cast<uint64_t>(job_seed), "sample");
  return state;
}

nlohmann::json TrainState::to_json(const Context& c) const {
  return {{"step", step},
          {"world_size", c.world_size},
          {"optimizer", {{"name", "adamw"}, {"steps_taken", c.optimizer_steps}}},
          {"lr_scheduler", {{"step", lr_step()}, {"total_steps", c.total_steps}}},
          {"dataloader",
           {{"seed", data_seed},
            {"step", data_step()},
            {"samples_consumed", data_step() * c.global_batch_size},
            {"global_batch_size", c.global_batch_size}}},
          {"rng",
           {{"sample_seed", sample_seed},
            {"note", "every random draw is a pure function of (seed, position)"}}}};
}

TrainState::Saved TrainState::read(const std::string& step_dir) {
  const std::filesystem::path path = std::filesystem::path(step_dir) / "train_state.json";
  std::ifstream in(path);
  if (!in) throw CheckpointError(fmt::format("{} is missing", path.string()));
  try {
    const nlohmann::json state = nlohmann::json::parse(in);
    Saved saved;
    saved.optimizer_steps = state.at("optimizer").at("steps_taken").get<int64_t>();
    saved.data_seed = state.at("dataloader").at("seed").get<uint64_t>();
    saved.data_step = state.at("dataloader").at("step").get<int64_t>();
    saved.sample_seed = state.at("rng").at("sample_seed").get<uint64_t>();
    return saved;
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError(
        fmt::format("{} is damaged: {}\nHINT: resume from another step (checkpoint.load_step)",
                    path.string(), e.what()));
  }
}

}  // namespace strata
