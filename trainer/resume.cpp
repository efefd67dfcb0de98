// Resume planning and loading.
#include "trainer/resume.h"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>

#include "checkpoint/checkpoint_manager.h"
#include "trainer/hf_io.h"
#include "trainer/seed.h"

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

}  // namespace

ResumePlan plan_resume(const CheckpointConfig& k, const fs::path& folder) {
  ResumePlan plan;
  if (k.enable && fs::exists(folder)) {
    if (auto own = find_checkpoint(folder.string(), k.load_step)) {
      plan.dir = *own;
      plan.own = true;
      plan.reason = fmt::format("the run's own checkpoint folder {} has committed checkpoints ({})",
                                folder.string(), k.load_step ? "checkpoint.load_step" : "latest");
      return plan;
    }
  }
  if (k.resume_path) {
    // A Hub spec was resolved at start-up to its snapshot directory in the HF cache.
    const std::string path = k.resume_dir.value_or(*k.resume_path);
    // The log names the directory; the reason names the spec when it was a Hub spec.
    const std::string spec = path == *k.resume_path ? "" : " " + *k.resume_path;
    const std::string named = path == *k.resume_path ? path : fmt::format("{} ({})", *k.resume_path, path);
    if (is_hf_model_dir(path)) {
      plan.dir = path;
      plan.hf = true;
      plan.weights_only = true;
      plan.reason = fmt::format("checkpoint.resume_path{} is a Hugging Face model directory", spec);
      return plan;
    }
    auto found = find_checkpoint(path, k.load_step);
    if (!found) {
      throw CheckpointError(fmt::format(
          "checkpoint.resume_path {} holds no committed Strata checkpoint (no metadata.json, no "
          "step-NNNNNNN directory) and is no Hugging Face model directory (config.json with "
          "model.safetensors or model.safetensors.index.json)\nHINT: point it at a Strata "
          "checkpoint folder or step directory, or at a Hugging Face model directory",
          named));
    }
    plan.dir = *found;
    plan.weights_only = k.resume_model_only;
    plan.reason = fmt::format("checkpoint.resume_path{}{}", spec, k.resume_model_only ? " with resume_model_only" : "");
    return plan;
  }
  plan.reason = k.enable ? fmt::format("no committed checkpoint in {} and no checkpoint.resume_path",
                                       folder.string())
                         : "checkpoint.enable is false and no checkpoint.resume_path";
  return plan;
}

Resumed load_resume_source(const ResumePlan& plan, const ModelConfig& mc, const CheckpointConfig& kc,
                           int64_t job_seed, int64_t total_steps, Communicator& comm,
                           AdamW& optimizer, const PiecesOf& pieces_of, const ResumeLog& log) {
  Resumed r;
  r.data_seed = static_cast<uint64_t>(job_seed);
  r.sample_seed = derive_seed(static_cast<uint64_t>(job_seed), "sample");
  if (plan.hf) {
    const auto load_start = Clock::now();
    run_on_all_ranks(comm, fmt::format("loading Hugging Face model {}", plan.dir), [&] {
      std::vector<TensorPiece> pieces = pieces_of(nullptr, PieceUse::kLoad);
      load_hf_model(plan.dir, mc, pieces);
      for (const TensorPiece& piece : pieces) r.loaded.insert(piece.key);
    });
    say(log, "resume: loaded model from {} because {}; weights only, training starts at step 1 "
        "({:.3f} s)",
        plan.dir, plan.reason, seconds_since(load_start));
    return r;
  }
  if (!plan.dir.empty()) {
    std::vector<std::string> restored;
    // A model-only checkpoint gives the weights (and, from the run's own folder, the step and
    // data position); resume_model_only gives the weights only.
    bool model_only_checkpoint = false;
    int64_t checkpoint_step = 0, saved_data_step = 0;
    uint64_t saved_data_seed = 0, saved_sample_seed = 0;
    double load_seconds = 0.0, load_bytes = 0.0;
    run_on_all_ranks(comm, fmt::format("loading checkpoint {}", plan.dir), [&] {
      const auto load_start = Clock::now();
      const CheckpointReader reader(plan.dir);
      model_only_checkpoint = reader.model_only();
      checkpoint_step = reader.step();
      const bool want_optimizer = !plan.weights_only && !model_only_checkpoint && !excluded(kc, "optimizer");
      std::vector<TensorPiece> pieces = pieces_of(want_optimizer ? &optimizer : nullptr, PieceUse::kLoad);
      {
        at::NoGradGuard no_grad;
        reader.load(pieces);
      }
      for (const TensorPiece& piece : pieces) load_bytes += static_cast<double>(piece.local.nbytes());
      load_seconds = seconds_since(load_start);
      const fs::path state_path = fs::path(plan.dir) / "train_state.json";
      std::ifstream in(state_path);
      if (!in) throw CheckpointError(fmt::format("{} is missing", state_path.string()));
      try {
        const nlohmann::json state = nlohmann::json::parse(in);
        if (want_optimizer) optimizer.set_steps_taken(state.at("optimizer").at("steps_taken").get<int64_t>());
        saved_data_seed = state.at("dataloader").at("seed").get<uint64_t>();
        saved_data_step = state.at("dataloader").at("step").get<int64_t>();
        saved_sample_seed = state.at("rng").at("sample_seed").get<uint64_t>();
      } catch (const nlohmann::json::exception& e) {
        throw CheckpointError(fmt::format("{} is damaged: {}\nHINT: resume from another step "
                                          "(checkpoint.load_step)",
                                          state_path.string(), e.what()));
      }
    });
    for (const TensorPiece& piece : pieces_of(nullptr, PieceUse::kLoad)) r.loaded.insert(piece.key);
    restored.push_back("model");
    const bool full = !plan.weights_only && (!model_only_checkpoint || plan.own);
    if (full) {
      r.step = checkpoint_step;
      if (!model_only_checkpoint && !excluded(kc, "optimizer")) restored.push_back("optimizer");
      if (excluded(kc, "lr_scheduler")) {
        r.lr_step_offset = r.step;
      } else {
        restored.push_back("lr_scheduler");
      }
      if (excluded(kc, "dataloader")) {
        r.data_step_offset = r.step;
      } else {
        r.data_seed = saved_data_seed;
        r.data_step_offset = r.step - saved_data_step;
        restored.push_back("dataloader");
      }
      if (!excluded(kc, "rng")) {
        r.sample_seed = saved_sample_seed;
        restored.push_back("rng");
      }
    }
    say(log, "resume: loaded {} from {} (step {}) because {}{}", fmt::join(restored, ", "), plan.dir,
        checkpoint_step, plan.reason,
        full ? fmt::format("; training continues at step {}", r.step + 1)
             : "; weights only, training starts at step 1");
    say(log, "resume: rank 0 read {:.1f} MB in {:.3f} s ({:.0f} MB/s)", load_bytes / 1e6, load_seconds,
        load_bytes / 1e6 / std::max(load_seconds, 1e-9));
    if (model_only_checkpoint && full && r.step < total_steps) {
      say(log, "resume: warning: {} is a model-only checkpoint: AdamW moments start from zero", plan.dir);
    }
  } else {
    say(log, "resume: none, training from scratch because {}", plan.reason);
  }
  return r;
}

}  // namespace strata
