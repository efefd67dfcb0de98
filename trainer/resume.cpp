// Resume planning and restoring the training state.
#include "trainer/resume.h"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>

#include "checkpoint/checkpoint_manager.h"
#include "trainer/model/converters/peft.h"

namespace strata {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

template <typename... Args>
void say(const ResumeLog& log, fmt::format_string<Args...> format, Args&&... args) {
  log(fmt::format(format, std::forward<Args>(args)...));
}

bool excluded(const CheckpointConfig& k, const std::string& what) {
  return std::find(k.exclude_from_loading.begin(), k.exclude_from_loading.end(), what) !=
         k.exclude_from_loading.end();
}

void set_primary(ResumePlan& plan, const WeightSource& source) {
  plan.dir = source.dir;
  plan.given = source.given;
  plan.hf = source.kind == WeightSource::Kind::kHf;
}

}  // namespace

std::string ResumePlan::to_json() const {
  nlohmann::json extras = nlohmann::json::array();
  for (const WeightSource& s : extra) extras.push_back({s.given, s.dir, static_cast<int>(s.kind)});
  return nlohmann::json{
      {"dir", dir}, {"given", given}, {"reason", reason}, {"weights_only", weights_only},
      {"own", own}, {"hf", hf},       {"extra", extras}}
      .dump();
}

ResumePlan ResumePlan::from_json(const std::string& text) {
  const nlohmann::json j = nlohmann::json::parse(text);
  ResumePlan plan{j["dir"], j["given"], j["reason"], j["weights_only"], j["own"], j["hf"], {}};
  for (const nlohmann::json& s : j["extra"]) {
    plan.extra.push_back({s[0], s[1], static_cast<WeightSource::Kind>(s[2].get<int>())});
  }
  return plan;
}

nlohmann::json adapter_only_record(const ResumePlan& plan) {
  nlohmann::json bases = nlohmann::json::array();
  if (plan.own) {
    const nlohmann::json meta = CheckpointReader(plan.dir).metadata();
    if (meta.contains("adapter_only")) return meta.at("adapter_only").at("bases");
  } else if (!plan.dir.empty()) {
    bases.push_back({{"source", plan.given}, {"fingerprint", source_fingerprint(plan.dir)}});
  }
  for (const WeightSource& s : plan.extra) {
    if (s.kind != WeightSource::Kind::kPeft && !plan.own) {
      bases.push_back({{"source", s.given}, {"fingerprint", source_fingerprint(s.dir)}});
    }
  }
  if (bases.empty()) {
    throw CheckpointError(
        fmt::format("converters: save: adapter_only keeps the converters' keys alone, so the run "
                    "needs its base model from a "
                    "source to record and reload, and it has none ({})\nHINT: set "
                    "checkpoint.resume_path to the base model, or "
                    "save: full",
                    plan.reason));
  }
  return bases;
}

void ResumePlan::relocate(const std::map<std::string, std::string>& rank0_dirs,
                          const std::map<std::string, std::string>& mine) {
  auto move = [&](const std::string& given, std::string& path) {
    const auto theirs = rank0_dirs.find(given), ours = mine.find(given);
    if (theirs == rank0_dirs.end() || ours == mine.end() || theirs->second == ours->second) return;
    const fs::path below = fs::path(path).lexically_relative(theirs->second);
    path = below.empty() || below == "." ? ours->second : (fs::path(ours->second) / below).string();
  };
  if (!own) move(given, dir);
  for (WeightSource& s : extra) move(s.given, s.dir);
}

std::map<std::string, std::string> resolve_load_paths(const CheckpointConfig& k,
                                                      const LocalDir& resolve) {
  std::map<std::string, std::string> local;
  std::vector<std::string> paths = k.additional_load_paths;
  if (k.resume_path) paths.insert(paths.begin(), *k.resume_path);
  for (const std::string& path : paths) {
    if (local.count(path)) continue;
    local[path] = resolve(path);
    // A PEFT adapter as resume_path brings its base: resolve that too.
    if (k.resume_path && path == *k.resume_path && is_peft_adapter_dir(local[path])) {
      const std::string base = peft_base(local[path]);
      if (!base.empty() && !local.count(base)) local[base] = resolve(base);
    }
  }
  return local;
}

ResumePlan plan_resume(const CheckpointConfig& k, const fs::path& folder,
                       const LocalDir& local_dir) {
  ResumePlan plan;
  if (k.enable && fs::exists(folder)) {
    if (auto own = find_checkpoint(folder.string(), k.load_step)) {
      plan.dir = *own;
      plan.given = *own;
      plan.own = true;
      plan.reason = fmt::format("the run's own checkpoint folder {} has committed checkpoints ({})",
                                folder.string(), k.load_step ? "checkpoint.load_step" : "latest");
      // An adapter-only checkpoint: its bases again, unchanged.
      plan.extra = adapter_only_bases(*own, local_dir);
      if (!plan.extra.empty()) {
        plan.reason += fmt::format("; adapter-only, its base{} reloaded and verified",
                                   plan.extra.size() == 1 ? "" : "s");
      }
      return plan;
    }
  }
  // Merged after the primary source, in order: additional_load_paths (weights only; a PEFT
  // adapter gives its LoRA factors).
  for (const std::string& path : k.additional_load_paths) {
    plan.extra.push_back(classify_source(path, local_dir(path), std::nullopt,
                                         "checkpoint.additional_load_paths entry"));
  }
  if (k.resume_path) {
    // The log names the directory; the reason names the spec when it was a Hub spec.
    const std::string spec =
        local_dir(*k.resume_path) == *k.resume_path ? "" : " " + *k.resume_path;
    const std::vector<WeightSource> sources =
        expand_source(*k.resume_path, local_dir, k.load_step, "checkpoint.resume_path");
    set_primary(plan, sources.front());
    plan.extra.insert(plan.extra.begin(), sources.begin() + 1, sources.end());
    if (sources.back().kind == WeightSource::Kind::kPeft) {
      // An adapter: its base first (what base_model_name_or_path names), the adapter on top.
      plan.reason = fmt::format("checkpoint.resume_path{} is a PEFT adapter on base {}", spec,
                                sources.front().given);
      plan.weights_only = true;
    } else {
      plan.reason = fmt::format("checkpoint.resume_path{}{}", spec,
                                plan.hf               ? " is a Hugging Face model directory"
                                : k.resume_model_only ? " with resume_model_only"
                                                      : "");
      plan.weights_only = plan.hf || k.resume_model_only;
    }
    return plan;
  }
  if (!plan.extra.empty() && plan.extra.front().kind != WeightSource::Kind::kPeft) {
    // additional_load_paths alone: the first is the primary source.
    set_primary(plan, plan.extra.front());
    plan.extra.erase(plan.extra.begin());
    plan.weights_only = true;
    plan.reason = "checkpoint.additional_load_paths (weights only)";
    return plan;
  }
  plan.reason = k.enable
                    ? fmt::format("no committed checkpoint in {} and no checkpoint.resume_path",
                                  folder.string())
                    : "checkpoint.enable is false and no checkpoint.resume_path";
  return plan;
}

Resumed resume(const ResumePlan& plan, const CheckpointConfig& kc, int64_t job_seed,
               int64_t total_steps, const WeightTarget& target, AdamW& optimizer,
               const PiecesOf& pieces_of, Communicator& comm, const ResumeLog& log) {
  Resumed r;
  r.state = TrainState::fresh(job_seed);
  std::map<std::string, std::string> provider;  // parameter -> the source that gave it
  // Converter-owned keys (LoRA factors) come from a source that has them, else the initialiser.
  auto owned = [&](const std::string& key) { return target.converters->owned(parameter_of(key)); };
  if (plan.hf) {
    const auto load_start = Clock::now();
    load_weight_sources({{plan.given, plan.dir, WeightSource::Kind::kHf}}, target, provider, &comm,
                        [](const std::string&) {});
    say(log,
        "resume: loaded model from {} because {}; weights only, training starts at step 1 "
        "({} tensors, {:.3f} s)",
        plan.dir, plan.reason, provider.size(), seconds_since(load_start));
  }
  if (!plan.dir.empty() && !plan.hf) {
    std::vector<std::string> restored;
    // A model-only checkpoint gives the weights (and, from the run's own folder, the step and
    // data position); resume_model_only gives the weights only.
    bool model_only_checkpoint = false;
    bool lacks_converter_keys = false;
    int64_t checkpoint_step = 0;
    TrainState::Saved saved;
    double load_seconds = 0.0, load_bytes = 0.0;
    run_on_all_ranks<CheckpointError>(comm, fmt::format("loading checkpoint {}", plan.dir), [&] {
      const auto load_start = Clock::now();
      const CheckpointReader reader(plan.dir);
      model_only_checkpoint = reader.model_only();
      checkpoint_step = reader.step();
      // A checkpoint of a run without this run's converters (a base for LoRA) gives weights:
      // its step, schedule and optimizer belong to another training.
      for (const TensorPiece& piece : pieces_of(nullptr, PieceUse::kLoad)) {
        if (owned(piece.key) && !reader.contains(piece.key)) lacks_converter_keys = true;
      }
      const bool want_optimizer = !plan.weights_only && !lacks_converter_keys &&
                                  !model_only_checkpoint && !excluded(kc, "optimizer");
      // A checkpoint without a converter's keys (a base model for LoRA) gives the rest.
      // An adapter-only checkpoint has the converters' keys alone (its bases follow as sources).
      const bool adapter_only = reader.metadata().contains("adapter_only");
      std::vector<TensorPiece> pieces =
          keep_if(pieces_of(want_optimizer ? &optimizer : nullptr, PieceUse::kLoad),
                  [&](const std::string& k) {
                    return adapter_only ? reader.contains(k) : !owned(k) || reader.contains(k);
                  });
      {
        at::NoGradGuard no_grad;
        reader.load(pieces);
      }
      for (const TensorPiece& piece : pieces) {
        if (piece.key.rfind("optimizer.", 0) != 0) provider[piece.key] = plan.dir;
      }
      for (const TensorPiece& piece : pieces)
        load_bytes += static_cast<double>(piece.local.nbytes());
      load_seconds = seconds_since(load_start);
      // The training state only when it is resumed (weights alone need no train_state.json).
      if (!plan.weights_only && !lacks_converter_keys) {
        saved = TrainState::read(plan.dir, checkpoint_step, model_only_checkpoint);
        if (want_optimizer) optimizer.set_steps_taken(saved.optimizer_steps);
      }
    });
    restored.push_back("model");
    const bool full =
        !plan.weights_only && !lacks_converter_keys && (!model_only_checkpoint || plan.own);
    if (lacks_converter_keys && !plan.weights_only) {
      say(log,
          "resume: {} has none of the converters' tensors: weights only (they start fresh, at step "
          "1)",
          plan.dir);
    }
    if (full) {
      r.state.step = checkpoint_step;
      if (!model_only_checkpoint && !excluded(kc, "optimizer")) restored.push_back("optimizer");
      if (excluded(kc, "lr_scheduler")) {
        r.state.lr_step_offset = r.state.step;
      } else {
        // The schedule's saved position (behind the step when an earlier resume restarted it).
        r.state.lr_step_offset = r.state.step - saved.lr_step;
        restored.push_back("lr_scheduler");
      }
      if (excluded(kc, "dataloader")) {
        r.state.data_step_offset = r.state.step;
      } else {
        r.state.data_seed = saved.data_seed;
        r.state.data_step_offset = r.state.step - saved.data_step;
        restored.push_back("dataloader");
      }
      if (!excluded(kc, "rng")) {
        r.state.sample_seed = saved.sample_seed;
        restored.push_back("rng");
      }
    }
    say(log, "resume: loaded {} from {} (step {}) because {}{}", fmt::join(restored, ", "),
        plan.dir, checkpoint_step, plan.reason,
        full ? fmt::format("; training continues at step {}", r.state.step + 1)
             : "; weights only, training starts at step 1");
    say(log, "resume: rank 0 read {:.1f} MB in {:.3f} s ({:.0f} MB/s)", load_bytes / 1e6,
        load_seconds, load_bytes / 1e6 / std::max(load_seconds, 1e-9));
    if (model_only_checkpoint && full && r.state.step < total_steps) {
      say(log, "resume: warning: {} is a model-only checkpoint: AdamW moments start from zero",
          plan.dir);
    }
  } else if (plan.dir.empty() && plan.extra.empty()) {
    say(log, "resume: none, training from scratch because {}", plan.reason);
  }
  load_weight_sources(plan.extra, target, provider, &comm, log);
  for (const auto& [key, source] : provider) r.loaded.insert(key);
  return r;
}

}  // namespace strata
