// Resume planning and loading.
#include "trainer/resume.h"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <map>
#include <optional>
#include <nlohmann/json.hpp>

#include "checkpoint/checkpoint_manager.h"
#include "checkpoint/file_io.h"
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

const char* kind_name(LoadSource::Kind kind) {
  switch (kind) {
    case LoadSource::Kind::kStrata: return "Strata checkpoint";
    case LoadSource::Kind::kHf: return "Hugging Face model";
    case LoadSource::Kind::kPeft: return "PEFT adapter";
  }
  return "";
}

std::vector<TensorPiece> keep_if(std::vector<TensorPiece> pieces, const std::function<bool(const std::string&)>& keep) {
  pieces.erase(std::remove_if(pieces.begin(), pieces.end(), [&](const TensorPiece& p) { return !keep(p.key); }),
               pieces.end());
  return pieces;
}

// What a directory holds, for loading: a PEFT adapter (checked first: an export with the
// adapter beside its base is both), an HF model, or a Strata checkpoint (its step directory).
LoadSource classify(const std::string& given, const std::string& dir, std::optional<int64_t> load_step,
                    const std::string& role) {
  if (is_peft_adapter_dir(dir)) return {given, dir, LoadSource::Kind::kPeft};
  if (is_hf_model_dir(dir)) return {given, dir, LoadSource::Kind::kHf};
  if (auto found = find_checkpoint(dir, load_step)) return {given, *found, LoadSource::Kind::kStrata};
  const std::string named = given == dir ? dir : fmt::format("{} ({})", given, dir);
  throw CheckpointError(fmt::format(
      "{} {} holds no committed Strata checkpoint (no metadata.json, no step-NNNNNNN directory), is no "
      "Hugging Face model directory (config.json with model.safetensors or model.safetensors.index.json) "
      "and no PEFT adapter (adapter_config.json with adapter_model.safetensors)\nHINT: point it at a Strata "
      "checkpoint folder or step directory, a Hugging Face model directory or a PEFT adapter directory",
      role, named));
}

}  // namespace

std::string ResumePlan::to_json() const {
  nlohmann::json extras = nlohmann::json::array();
  for (const LoadSource& s : extra) extras.push_back({s.given, s.dir, static_cast<int>(s.kind)});
  return nlohmann::json{{"dir", dir}, {"given", given}, {"reason", reason}, {"weights_only", weights_only},
                        {"own", own}, {"hf", hf},       {"extra", extras}}
      .dump();
}

ResumePlan ResumePlan::from_json(const std::string& text) {
  const nlohmann::json j = nlohmann::json::parse(text);
  ResumePlan plan{j["dir"], j["given"], j["reason"], j["weights_only"], j["own"], j["hf"], {}};
  for (const nlohmann::json& s : j["extra"]) {
    plan.extra.push_back({s[0], s[1], static_cast<LoadSource::Kind>(s[2].get<int>())});
  }
  return plan;
}

std::string source_fingerprint(const std::string& dir) {
  const fs::path root = fs::is_directory(dir) ? fs::path(dir) : fs::path(dir).parent_path();
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(root)) {
    const std::string name = entry.path().filename().string();
    const bool weights_or_config = name.size() > 5 && (name.rfind(".json") == name.size() - 5 ||
                                                       (name.size() > 12 && name.rfind(".safetensors") == name.size() - 12));
    if (weights_or_config && name.rfind("adapter_", 0) != 0 && fs::is_regular_file(entry.path())) names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  Sha256 all;
  for (const std::string& name : names) {
    const FileDigest d = digest_file((root / name).string());
    const std::string line = fmt::format("{} {} {}\n", name, d.size, d.sha256);
    all.update(line.data(), line.size());
  }
  return all.hex_digest();
}

nlohmann::json adapter_only_bases(const ResumePlan& plan) {
  nlohmann::json bases = nlohmann::json::array();
  if (plan.own) {
    const nlohmann::json meta = nlohmann::json::parse(std::ifstream(fs::path(plan.dir) / "metadata.json"));
    if (meta.contains("adapter_only")) return meta["adapter_only"]["bases"];
  } else if (!plan.dir.empty()) {
    bases.push_back({{"source", plan.given}, {"fingerprint", source_fingerprint(plan.dir)}});
  }
  for (const LoadSource& s : plan.extra) {
    if (s.kind != LoadSource::Kind::kPeft && !plan.own) {
      bases.push_back({{"source", s.given}, {"fingerprint", source_fingerprint(s.dir)}});
    }
  }
  if (bases.empty()) {
    throw CheckpointError(fmt::format(
        "converters: save: adapter_only keeps the converters' keys alone, so the run needs its base model from a "
        "source to record and reload, and it has none ({})\nHINT: set checkpoint.resume_path to the base model, or "
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
  for (LoadSource& s : extra) move(s.given, s.dir);
}

std::map<std::string, std::string> resolve_load_paths(const CheckpointConfig& k,
                                                      const std::function<std::string(const std::string&)>& resolve) {
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
                       const std::function<std::string(const std::string&)>& local_dir) {
  ResumePlan plan;
  if (k.enable && fs::exists(folder)) {
    if (auto own = find_checkpoint(folder.string(), k.load_step)) {
      plan.dir = *own;
      plan.given = *own;
      plan.own = true;
      plan.reason = fmt::format("the run's own checkpoint folder {} has committed checkpoints ({})",
                                folder.string(), k.load_step ? "checkpoint.load_step" : "latest");
      // An adapter-only checkpoint: its bases again, unchanged.
      const nlohmann::json meta = nlohmann::json::parse(std::ifstream(fs::path(*own) / "metadata.json"));
      if (meta.contains("adapter_only")) {
        for (const nlohmann::json& base : meta["adapter_only"].at("bases")) {
          const std::string given = base.at("source");
          LoadSource source = classify(given, local_dir(given), std::nullopt,
                                       fmt::format("the base recorded in adapter-only checkpoint {}", *own));
          if (source.kind == LoadSource::Kind::kPeft) source.kind = LoadSource::Kind::kHf;
          const std::string now = source_fingerprint(source.kind == LoadSource::Kind::kStrata ? source.dir : local_dir(given));
          if (now != base.at("fingerprint").get<std::string>()) {
            throw CheckpointError(fmt::format(
                "adapter-only checkpoint {} was saved on base {} with fingerprint {}, but {} now has fingerprint {}: "
                "the base model changed\nHINT: point the run at the original base, or resume from a full checkpoint "
                "(converters.N.save: full)",
                *own, given, base.at("fingerprint").get<std::string>(), local_dir(given), now));
          }
          plan.extra.push_back(source);
        }
        plan.reason += fmt::format("; adapter-only, its base{} reloaded and verified",
                                   meta["adapter_only"]["bases"].size() == 1 ? "" : "s");
      }
      return plan;
    }
  }
  // Merged after the primary source, in order: additional_load_paths (weights only; a PEFT
  // adapter gives its LoRA factors).
  for (const std::string& path : k.additional_load_paths) {
    LoadSource source = classify(path, local_dir(path), std::nullopt, "checkpoint.additional_load_paths entry");
    plan.extra.push_back(source);
  }
  if (k.resume_path) {
    const std::string path = local_dir(*k.resume_path);
    // The log names the directory; the reason names the spec when it was a Hub spec.
    const std::string spec = path == *k.resume_path ? "" : " " + *k.resume_path;
    LoadSource source = classify(*k.resume_path, path, k.load_step, "checkpoint.resume_path");
    if (source.kind == LoadSource::Kind::kPeft) {
      // An adapter: its base first (what base_model_name_or_path names), the adapter on top.
      const std::string base = peft_base(path);
      if (base.empty()) {
        throw CheckpointError(fmt::format("checkpoint.resume_path {} is a PEFT adapter whose adapter_config.json "
                                          "names no base_model_name_or_path\nHINT: set resume_path to the base "
                                          "model and list the adapter in checkpoint.additional_load_paths",
                                          *k.resume_path));
      }
      plan.extra.insert(plan.extra.begin(), source);
      source = classify(base, local_dir(base), std::nullopt, fmt::format("the base of PEFT adapter {}", *k.resume_path));
      if (source.kind == LoadSource::Kind::kPeft) {
        source.kind = LoadSource::Kind::kHf;  // an export with the adapter beside its base: the base
      }
      plan.reason = fmt::format("checkpoint.resume_path{} is a PEFT adapter on base {}", spec, base);
      plan.weights_only = true;
    } else {
      plan.reason = fmt::format("checkpoint.resume_path{}{}", spec,
                                source.kind == LoadSource::Kind::kHf ? " is a Hugging Face model directory"
                                : k.resume_model_only               ? " with resume_model_only"
                                                                    : "");
      plan.weights_only = source.kind == LoadSource::Kind::kHf || k.resume_model_only;
    }
    plan.dir = source.dir;
    plan.given = source.given;
    plan.hf = source.kind == LoadSource::Kind::kHf;
    return plan;
  }
  if (!plan.extra.empty()) {  // additional_load_paths alone: the first is the primary source
    const LoadSource first = plan.extra.front();
    if (first.kind != LoadSource::Kind::kPeft) {
      plan.extra.erase(plan.extra.begin());
      plan.dir = first.dir;
      plan.given = first.given;
      plan.hf = first.kind == LoadSource::Kind::kHf;
      plan.weights_only = true;
      plan.reason = "checkpoint.additional_load_paths (weights only)";
      return plan;
    }
  }
  plan.reason = k.enable ? fmt::format("no committed checkpoint in {} and no checkpoint.resume_path",
                                       folder.string())
                         : "checkpoint.enable is false and no checkpoint.resume_path";
  return plan;
}

Resumed load_resume_source(const ResumePlan& plan, const ModelConfig& mc, const CheckpointConfig& kc,
                           const Converters& converters, const std::vector<ConverterConfig>& converter_configs,
                           int64_t job_seed, int64_t total_steps, Communicator& comm,
                           AdamW& optimizer, const PiecesOf& pieces_of, const ResumeLog& log) {
  Resumed r;
  r.data_seed = static_cast<uint64_t>(job_seed);
  r.sample_seed = derive_seed(static_cast<uint64_t>(job_seed), "sample");
  // Converter-owned keys (LoRA factors) come from a source that has them, else the initialiser.
  auto owned = [&](const std::string& key) { return converters.owned(parameter_of(key)); };
  if (plan.hf) {
    const auto load_start = Clock::now();
    run_on_all_ranks(comm, fmt::format("loading Hugging Face model {}", plan.dir), [&] {
      std::vector<TensorPiece> pieces = keep_if(pieces_of(nullptr, PieceUse::kLoad), [&](const std::string& k) { return !owned(k); });
      load_hf_model(plan.dir, mc, pieces);
      for (const TensorPiece& piece : pieces) r.loaded.insert(piece.key);
    });
    say(log, "resume: loaded model from {} because {}; weights only, training starts at step 1 "
        "({} tensors, {:.3f} s)",
        plan.dir, plan.reason, r.loaded.size(), seconds_since(load_start));
  } else if (!plan.dir.empty()) {
    std::vector<std::string> restored;
    // A model-only checkpoint gives the weights (and, from the run's own folder, the step and
    // data position); resume_model_only gives the weights only.
    bool model_only_checkpoint = false;
    bool lacks_converter_keys = false;
    int64_t checkpoint_step = 0, saved_data_step = 0;
    uint64_t saved_data_seed = 0, saved_sample_seed = 0;
    double load_seconds = 0.0, load_bytes = 0.0;
    run_on_all_ranks(comm, fmt::format("loading checkpoint {}", plan.dir), [&] {
      const auto load_start = Clock::now();
      const CheckpointReader reader(plan.dir);
      model_only_checkpoint = reader.model_only();
      checkpoint_step = reader.step();
      // A checkpoint of a run without this run's converters (a base for LoRA) gives weights:
      // its step, schedule and optimizer belong to another training.
      for (const TensorPiece& piece : pieces_of(nullptr, PieceUse::kLoad)) {
        if (owned(piece.key) && !reader.contains(piece.key)) lacks_converter_keys = true;
      }
      const bool want_optimizer = !plan.weights_only && !lacks_converter_keys && !model_only_checkpoint &&
                                  !excluded(kc, "optimizer");
      // A checkpoint without a converter's keys (a base model for LoRA) gives the rest.
      // An adapter-only checkpoint has the converters' keys alone (its bases follow as sources).
      const bool adapter_only = reader.metadata().contains("adapter_only");
      std::vector<TensorPiece> pieces =
          keep_if(pieces_of(want_optimizer ? &optimizer : nullptr, PieceUse::kLoad),
                  [&](const std::string& k) { return adapter_only ? reader.contains(k) : !owned(k) || reader.contains(k); });
      {
        at::NoGradGuard no_grad;
        reader.load(pieces);
      }
      for (const TensorPiece& piece : pieces) {
        if (piece.key.rfind("optimizer.", 0) != 0) r.loaded.insert(piece.key);
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
    restored.push_back("model");
    const bool full = !plan.weights_only && !lacks_converter_keys && (!model_only_checkpoint || plan.own);
    if (lacks_converter_keys && !plan.weights_only) {
      say(log, "resume: {} has none of the converters' tensors: weights only (they start fresh, at step 1)", plan.dir);
    }
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
  } else if (plan.extra.empty()) {
    say(log, "resume: none, training from scratch because {}", plan.reason);
  }

  // Further sources, in order: each fills the keys it has; no key may come twice.
  std::map<std::string, std::string> provider;  // parameter -> the source that gave it
  for (const std::string& key : r.loaded) provider[key] = plan.dir;
  for (const LoadSource& source : plan.extra) {
    std::set<std::string> got;
    const auto load_start = Clock::now();
    run_on_all_ranks(comm, fmt::format("loading {} {}", kind_name(source.kind), source.given), [&] {
      std::vector<TensorPiece> all = pieces_of(nullptr, PieceUse::kLoad);
      auto check_twice = [&](const std::vector<std::string>& keys) {
        for (const std::string& key : keys) {
          if (provider.count(key)) {
            throw CheckpointError(fmt::format(
                "{} is provided by two sources: {} and {} ({})\nHINT: list each tensor in one source only "
                "(e.g. the base model in resume_path, the adapter in additional_load_paths)",
                key, provider.at(key), source.given, kind_name(source.kind)));
          }
        }
      };
      at::NoGradGuard no_grad;
      std::vector<TensorPiece> pieces;
      if (source.kind == LoadSource::Kind::kPeft) {
        const auto lora = std::find_if(converter_configs.begin(), converter_configs.end(),
                                       [](const ConverterConfig& c) { return c.type == "lora"; });
        if (lora == converter_configs.end()) {
          throw CheckpointError(fmt::format("{} is a PEFT LoRA adapter, but the run has no LoRA converter\nHINT: add "
                                            "converters: [{{type: lora, ...}}] with the adapter's r, alpha and targets",
                                            source.given));
        }
        const std::set<std::string> filled = load_peft_adapter(source.dir, mc, converters, *lora, all);
        check_twice(std::vector<std::string>(filled.begin(), filled.end()));
        got = filled;
        return;
      }
      if (source.kind == LoadSource::Kind::kHf) {
        pieces = keep_if(all, [&](const std::string& k) { return !owned(k); });
        std::vector<std::string> keys;
        for (const TensorPiece& p : pieces) keys.push_back(p.key);
        check_twice(keys);
        load_hf_model(source.dir, mc, pieces);
      } else {
        const CheckpointReader reader(source.dir);
        pieces = keep_if(all, [&](const std::string& k) { return reader.contains(k); });
        std::vector<std::string> keys;
        for (const TensorPiece& p : pieces) keys.push_back(p.key);
        check_twice(keys);
        reader.load(pieces);
      }
      for (const TensorPiece& p : pieces) got.insert(p.key);
    });
    for (const std::string& key : got) {
      provider[key] = source.given;
      r.loaded.insert(key);
    }
    say(log, "load: {} ({}{}): {} tensors ({:.3f} s)", source.given, kind_name(source.kind),
        source.dir == source.given ? "" : ", " + source.dir, got.size(), seconds_since(load_start));
  }
  return r;
}

}  // namespace strata
