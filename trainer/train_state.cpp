// train_state.json, written and read in one place.
#include "trainer/train_state.h"

#include <fmt/format.h>

#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>

#include "checkpoint/errors.h"
#include "checkpoint/json_file.h"
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

namespace {

using json = nlohmann::json;

constexpr const char* kHint =
    "\nHINT: resume from another step (checkpoint.load_step), or load the weights alone "
    "(checkpoint.resume_model_only)";

[[noreturn]] void damaged(const std::string& path, const std::string& what) {
  throw CheckpointError(fmt::format("{} is damaged: {}{}", path, what, kHint));
}

const json& member(const json& obj, const char* name, const std::string& where,
                   const std::string& path) {
  if (!obj.is_object()) damaged(path, fmt::format("{} is not an object", where));
  const auto it = obj.find(name);
  if (it == obj.end()) damaged(path, fmt::format("{} has no \"{}\"", where, name));
  return *it;
}

// A count: an integer in [min, max].
int64_t count(const json& obj, const char* name, const std::string& where, const std::string& path,
              int64_t min = 0, int64_t max = std::numeric_limits<int64_t>::max()) {
  const json& v = member(obj, name, where, path);
  const std::string field = where == "the document" ? name : where + "." + name;
  if (!v.is_number_integer() ||
      (v.is_number_unsigned() &&
       v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())))
    damaged(path, fmt::format("{} is not an integer ({})", field, v.dump()));
  const int64_t n = v.get<int64_t>();
  if (n < min || n > max)
    damaged(path, fmt::format("{} = {} is outside [{}, {}]", field, n, min, max));
  return n;
}

uint64_t seed(const json& obj, const char* name, const std::string& where,
              const std::string& path) {
  const json& v = member(obj, name, where, path);
  if (!v.is_number_integer() || (!v.is_number_unsigned() && v.get<int64_t>() < 0))
    damaged(path, fmt::format("{}.{} is not a non-negative integer ({})", where, name, v.dump()));
  return v.get<uint64_t>();
}

}  // namespace

TrainState::Saved TrainState::validate(const nlohmann::json& state, const std::string& path,
                                       int64_t step, bool model_only) {
  const int64_t saved_step = count(state, "step", "the document", path);
  if (saved_step != step)
    damaged(path,
            fmt::format("step = {} but the checkpoint's metadata.json says {}", saved_step, step));
  // Fields a converted model's state gained later: optional there, checked when present.
  auto has = [&](const json& obj, const char* name) {
    return !model_only || (obj.is_object() && obj.contains(name));
  };
  if (has(state, "world_size")) count(state, "world_size", "the document", path, 1);
  Saved saved;
  const json& optimizer = member(state, "optimizer", "the document", path);
  saved.optimizer_steps = count(optimizer, "steps_taken", "optimizer", path);
  if (has(state, "lr_scheduler")) {
    const json& lr = member(state, "lr_scheduler", "the document", path);
    saved.lr_step = count(lr, "step", "lr_scheduler", path, 0, step);
    count(lr, "total_steps", "lr_scheduler", path);
  }
  const json& data = member(state, "dataloader", "the document", path);
  saved.data_seed = seed(data, "seed", "dataloader", path);
  saved.data_step = count(data, "step", "dataloader", path, 0, step);
  if (has(data, "global_batch_size") || has(data, "samples_consumed")) {
    // 0 in a converted model's state: no data drawn yet.
    const int64_t batch = count(data, "global_batch_size", "dataloader", path);
    const int64_t consumed = count(data, "samples_consumed", "dataloader", path);
    if ((batch > 0 && saved.data_step > std::numeric_limits<int64_t>::max() / batch) ||
        consumed != saved.data_step * batch)
      damaged(path, fmt::format("dataloader.samples_consumed = {} but step {} x global_batch_size "
                                "{} samples were drawn",
                                consumed, saved.data_step, batch));
  }
  saved.sample_seed = seed(member(state, "rng", "the document", path), "sample_seed", "rng", path);
  return saved;
}

TrainState::Saved TrainState::read(const std::string& step_dir, int64_t step, bool model_only) {
  const std::string path = (std::filesystem::path(step_dir) / "train_state.json").string();
  if (!std::filesystem::exists(path)) damaged(path, "the file is missing");
  json state;
  try {
    state = read_json_file(path);
  } catch (const CheckpointError& e) {
    throw CheckpointError(e.what() + std::string(kHint));
  }
  return validate(state, path, step, model_only);
}

}  // namespace strata
