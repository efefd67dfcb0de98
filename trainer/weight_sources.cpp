// Weight sources: classification, expansion (PEFT bases, adapter-only bases), loading, and
// whole models for inference.
#include "trainer/weight_sources.h"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "checkpoint/checkpoint_manager.h"
#include "checkpoint/file_io.h"
#include "checkpoint/hub/download.h"
#include "trainer/model/converters/peft.h"
#include "trainer/model/hf_io.h"
#include "trainer/state_pieces.h"

namespace strata {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

void print_to_stderr(const std::string& line) {
  fmt::print(stderr, "{}\n", line);
  std::fflush(stderr);
}

// A step directory's metadata.json, validated (CheckpointReader), or a CheckpointError naming
// it when it is damaged.
nlohmann::json read_metadata(const std::string& step_dir) {
  return CheckpointReader(step_dir).metadata();
}

// Runs `body` on every rank of `comm` agreeing on failures, or here alone.
void on_all_ranks(Communicator* comm, const std::string& what, const std::function<void()>& body) {
  if (comm) return run_on_all_ranks<CheckpointError>(*comm, what, body);
  body();
}

// Fills the pieces `source` has; returns their keys. Throws for a key `provider` already has.
std::set<std::string> load_one(const WeightSource& source, const WeightTarget& target,
                               const std::map<std::string, std::string>& provider) {
  std::vector<TensorPiece> all = target.pieces();
  auto check_twice = [&](const std::vector<std::string>& keys) {
    for (const std::string& key : keys) {
      if (provider.count(key)) {
        throw CheckpointError(fmt::format(
            "{} is provided by two sources: {} and {} ({})\nHINT: list each tensor in one source "
            "only "
            "(e.g. the base model in resume_path, the adapter in additional_load_paths)",
            key, provider.at(key), source.given, kind_name(source.kind)));
      }
    }
  };
  at::NoGradGuard no_grad;
  if (source.kind == WeightSource::Kind::kPeft) {
    const auto& configs = *target.converter_configs;
    const auto lora = std::find_if(configs.begin(), configs.end(),
                                   [](const ConverterConfig& c) { return c.type == "lora"; });
    if (lora == configs.end()) {
      throw CheckpointError(
          fmt::format("{} is a PEFT LoRA adapter, but the run has no LoRA converter\nHINT: add "
                      "converters: [{{type: lora, ...}}] with the adapter's r, alpha and targets",
                      source.given));
    }
    const std::set<std::string> filled =
        load_peft_adapter(source.dir, *target.model, *target.converters, *lora, all);
    check_twice(std::vector<std::string>(filled.begin(), filled.end()));
    return filled;
  }
  std::optional<CheckpointReader> reader;
  if (source.kind == WeightSource::Kind::kStrata) reader.emplace(source.dir);
  std::vector<TensorPiece> pieces = keep_if(all, [&](const std::string& k) {
    return reader ? reader->contains(k) : !target.converters->owned(k);
  });
  std::vector<std::string> keys;
  for (const TensorPiece& p : pieces) keys.push_back(p.key);
  check_twice(keys);
  if (reader) {
    reader->load(pieces);
  } else {
    load_hf_model(source.dir, *target.model, pieces);
  }
  return std::set<std::string>(keys.begin(), keys.end());
}

// A Strata checkpoint as a model to run: every tensor it holds has a place in the model (with
// the converters of the run that saved it), and every base tensor is in it or in its bases.
void check_fits(const std::string& dir, const std::vector<TensorPiece>& pieces,
                const Converters& converters, const std::string& config_problem) {
  const CheckpointReader reader(dir);
  std::set<std::string> placed;
  std::vector<std::string> unplaced, absent, reshaped;
  for (const TensorPiece& p : pieces) {
    if (reader.contains(p.key)) {
      placed.insert(p.key);
      if (reader.shape(p.key) != p.shape)
        reshaped.push_back(fmt::format("{} is [{}] but the model block makes it [{}]", p.key,
                                       fmt::join(reader.shape(p.key), ", "),
                                       fmt::join(p.shape, ", ")));
    } else if (!converters.owned(p.key) && !reader.metadata().contains("adapter_only")) {
      absent.push_back(p.key);
    }
  }
  for (const std::string& key : reader.keys()) {
    if (key.rfind("optimizer.", 0) != 0 && !placed.count(key)) unplaced.push_back(key);
  }
  if (unplaced.empty() && absent.empty() && reshaped.empty()) return;
  throw CheckpointError(fmt::format(
      "Strata checkpoint {} does not fit the model its metadata describes{}{}{}\nHINT: {}", dir,
      reshaped.empty() ? ""
                       : fmt::format("\n  shapes that disagree with metadata.json's \"model\": {}",
                                     fmt::join(reshaped, "; ")),
      unplaced.empty() ? ""
                       : fmt::format("\n  tensors the model lacks: {}", fmt::join(unplaced, ", ")),
      absent.empty() ? "" : fmt::format("\n  missing: {}", fmt::join(absent, ", ")),
      config_problem.empty()
          ? "the checkpoint may be damaged (strata inspect --verify)"
          : "the converters that made these tensors are named in the run's config.yaml, and " +
                config_problem));
}

}  // namespace

const char* kind_name(WeightSource::Kind kind) {
  switch (kind) {
    case WeightSource::Kind::kStrata:
      return "Strata checkpoint";
    case WeightSource::Kind::kHf:
      return "Hugging Face model";
    case WeightSource::Kind::kPeft:
      return "PEFT adapter";
  }
  return "";
}

WeightSource classify_source(const std::string& given, const std::string& dir,
                             std::optional<int64_t> load_step, const std::string& role) {
  if (is_peft_adapter_dir(dir)) return {given, dir, WeightSource::Kind::kPeft};
  if (is_hf_model_dir(dir)) return {given, dir, WeightSource::Kind::kHf};
  if (auto found = find_checkpoint(dir, load_step))
    return {given, *found, WeightSource::Kind::kStrata};
  const std::string named = given == dir ? dir : fmt::format("{} ({})", given, dir);
  throw CheckpointError(
      fmt::format("{} {} holds no committed Strata checkpoint (no metadata.json, no step-NNNNNNN "
                  "directory), is no "
                  "Hugging Face model directory (config.json with model.safetensors or "
                  "model.safetensors.index.json) "
                  "and no PEFT adapter (adapter_config.json with adapter_model.safetensors)\nHINT: "
                  "point it at a Strata "
                  "checkpoint folder or step directory, a Hugging Face model directory or a PEFT "
                  "adapter directory",
                  role, named));
}

std::string source_fingerprint(const std::string& dir) {
  const fs::path root = fs::is_directory(dir) ? fs::path(dir) : fs::path(dir).parent_path();
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(root)) {
    const std::string name = entry.path().filename().string();
    const bool weights_or_config =
        name.size() > 5 && (name.rfind(".json") == name.size() - 5 ||
                            (name.size() > 12 && name.rfind(".safetensors") == name.size() - 12));
    if (weights_or_config && name.rfind("adapter_", 0) != 0 && fs::is_regular_file(entry.path()))
      names.push_back(name);
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

std::vector<WeightSource> adapter_only_bases(const std::string& step_dir,
                                             const LocalDir& local_dir) {
  const nlohmann::json meta = read_metadata(step_dir);
  std::vector<WeightSource> bases;
  if (!meta.contains("adapter_only")) return bases;
  std::vector<std::pair<std::string, std::string>> recorded;  // source, fingerprint
  try {
    for (const nlohmann::json& base : meta.at("adapter_only").at("bases")) {
      recorded.emplace_back(base.at("source").get<std::string>(),
                            base.at("fingerprint").get<std::string>());
    }
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError(
        fmt::format("{}/metadata.json: adapter_only.bases is damaged ({})\nHINT: resume "
                    "from another step (checkpoint.load_step)",
                    step_dir, e.what()));
  }
  for (const auto& [given, fingerprint] : recorded) {
    const std::string dir = local_dir(given);
    WeightSource source =
        classify_source(given, dir, std::nullopt,
                        fmt::format("the base recorded in adapter-only checkpoint {}", step_dir));
    if (source.kind == WeightSource::Kind::kPeft) source.kind = WeightSource::Kind::kHf;
    const std::string now =
        source_fingerprint(source.kind == WeightSource::Kind::kStrata ? source.dir : dir);
    if (now != fingerprint) {
      throw CheckpointError(fmt::format(
          "adapter-only checkpoint {} was saved on base {} with fingerprint {}, but {} now has "
          "fingerprint {}: the base model changed\nHINT: point the run at the original base, or "
          "resume from a full checkpoint (converters.N.save: full)",
          step_dir, given, fingerprint, dir, now));
    }
    bases.push_back(source);
  }
  return bases;
}

std::vector<WeightSource> expand_source(const std::string& given, const LocalDir& local_dir,
                                        std::optional<int64_t> load_step, const std::string& role) {
  const std::string dir = local_dir(given);
  const WeightSource source = classify_source(given, dir, load_step, role);
  if (source.kind == WeightSource::Kind::kPeft) {
    const std::string base = peft_base(dir);
    if (base.empty()) {
      throw CheckpointError(
          fmt::format("{} {} is a PEFT adapter whose adapter_config.json names no "
                      "base_model_name_or_path\nHINT: write the base model's directory or Hub "
                      "id there, or load the base model first and the adapter in "
                      "checkpoint.additional_load_paths",
                      role, given));
    }
    WeightSource b = classify_source(base, local_dir(base), std::nullopt,
                                     fmt::format("the base of PEFT adapter {}", given));
    if (b.kind == WeightSource::Kind::kPeft)
      b.kind = WeightSource::Kind::kHf;  // an export with its adapter beside
    return {b, source};
  }
  std::vector<WeightSource> out = {source};
  if (source.kind == WeightSource::Kind::kStrata) {
    for (const WeightSource& base : adapter_only_bases(source.dir, local_dir)) out.push_back(base);
  }
  return out;
}

void load_weight_sources(const std::vector<WeightSource>& sources, const WeightTarget& target,
                         std::map<std::string, std::string>& provider, Communicator* comm,
                         const std::function<void(const std::string&)>& log) {
  for (const WeightSource& source : sources) {
    std::set<std::string> got;
    const auto start = Clock::now();
    on_all_ranks(comm, fmt::format("loading {} {}", kind_name(source.kind), source.given),
                 [&] { got = load_one(source, target, provider); });
    for (const std::string& key : got) provider[key] = source.given;
    log(fmt::format("load: {} ({}{}): {} tensors ({:.3f} s)", source.given, kind_name(source.kind),
                    source.dir == source.given ? "" : ", " + source.dir, got.size(),
                    std::chrono::duration<double>(Clock::now() - start).count()));
  }
}

ModelSource load_model_source(const std::string& given, const InferenceWorkload& workload) {
  // Hub specs resolve to their snapshots in the HF cache; progress goes to stderr, so that
  // stdout carries only the command's own output.
  // Each path resolves once (a Hub spec is looked up in the cache, or downloaded, once).
  std::map<std::string, std::string> resolved;
  const LocalDir local_dir = [&resolved](const std::string& path) {
    if (!resolved.count(path)) resolved[path] = resolve_model_path(path, nullptr, print_to_stderr);
    return resolved.at(path);
  };
  const std::vector<WeightSource> sources = expand_source(given, local_dir, std::nullopt, "--from");
  const WeightSource& first = sources.front();
  const std::string path = local_dir(given);
  const std::string named = path == given ? path : fmt::format("{} ({})", given, path);
  ModelSource out;
  // The model config, tokenizer and converters of the source.
  std::vector<ConverterConfig> converter_configs;
  std::string config_problem;
  if (sources.back().kind == WeightSource::Kind::kPeft) {
    converter_configs = {peft_converter_config(sources.back().dir)};
    out.description = fmt::format("PEFT adapter {} on {}", named, first.given);
  }
  if (first.kind == WeightSource::Kind::kHf) {
    out.config = hf_model_config(first.dir);
    if (fs::exists(fs::path(first.dir) / "tokenizer.model")) {
      out.tokenizer = (fs::path(first.dir) / "tokenizer.model").string();
    } else if (fs::exists(fs::path(first.dir) / "tokenizer.json")) {  // Llama 3, Qwen, ...
      out.tokenizer = (fs::path(first.dir) / "tokenizer.json").string();
    }
    if (out.description.empty()) out.description = fmt::format("Hugging Face model {}", named);
  } else {
    const CheckpointReader reader(first.dir);
    out.config = model_config_from_json(reader.metadata().value("model", nlohmann::json()),
                                        first.dir + "/metadata.json");
    out.step = reader.step();
    // The run's config (saved with the checkpoint) names its tokenizer and its converters.
    const fs::path config_yaml = fs::path(first.dir) / "config.yaml";
    config_problem = "it has no config.yaml";
    if (fs::exists(config_yaml)) {
      try {
        const Config run = load_config(config_yaml.string(), {});
        if (run.data.tokenizer && fs::exists(*run.data.tokenizer))
          out.tokenizer = run.data.tokenizer;
        if (converter_configs.empty()) converter_configs = run.converters;
        config_problem.clear();
      } catch (const ConfigError& e) {
        config_problem = fmt::format("its config.yaml does not load: {}", e.what());
      }
    }
    if (out.description.empty())
      out.description = fmt::format("Strata checkpoint {} (step {})", first.dir, out.step);
  }
  // Nothing allocated yet: a model (or window) too large for this machine stops here.
  ModelKeyNames names;
  if (first.kind == WeightSource::Kind::kHf) {
    names = hf_model_key_names((fs::path(first.dir) / "config.json").string());
  } else {
    names.file = (fs::path(first.dir) / "metadata.json").string();
  }
  check_inference_memory(out.config, converter_configs, workload, names, available_memory());
  for (ConverterConfig& c : converter_configs) c.export_mode = "merged";
  const Converters converters(converter_configs);
  Llama trained(out.config, &converters);
  const WeightTarget target{&out.config, &converters, &converter_configs,
                            [&] { return state_pieces(trained, nullptr, 0, 1, PieceUse::kLoad); }};
  // The model block against the tensors, on the meta device: nothing allocated yet.
  if (first.kind == WeightSource::Kind::kStrata)
    check_fits(first.dir, target.pieces(), converters, config_problem);
  trained.materialize(at::kCPU);
  std::map<std::string, std::string> provider;
  load_weight_sources(sources, target, provider, nullptr, [](const std::string&) {});
  std::set<std::string> loaded;
  for (const auto& [key, source] : provider) loaded.insert(key);
  trained.initialize(0, loaded);  // converter keys a source lacks (LoRA B = 0: no effect)
  // The model as it trained, every converter's transform applied (LoRA merged in).
  out.model = std::make_unique<Llama>(out.config);
  out.model->materialize(at::kCPU);
  {
    at::NoGradGuard no_grad;
    for (const auto& [fqn, t] : converters.export_view(trained.parameters()))
      out.model->parameters().at(fqn).copy_(t);
  }
  std::set<std::string> all;
  for (const auto& [fqn, t] : out.model->parameters()) all.insert(fqn);
  out.model->initialize(0, all);  // only the RoPE tables: every parameter was loaded
  return out;
}

}  // namespace strata
