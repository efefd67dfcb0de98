// Loading a model for inference from a checkpoint or an HF directory; file evaluation.
#include "trainer/model_source.h"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>

#include "checkpoint/checkpoint_manager.h"
#include "checkpoint/hub_download.h"
#include "trainer/converter.h"
#include "trainer/data_loader.h"
#include "trainer/hf_io.h"
#include "trainer/resume.h"
#include "trainer/train_state.h"

namespace strata {
namespace {

namespace fs = std::filesystem;

}  // namespace

nlohmann::json model_config_json(const ModelConfig& m) {
  return {{"name", m.name},
          {"vocab_size", m.vocab_size},
          {"dim", m.dim},
          {"n_layers", m.n_layers},
          {"n_heads", m.n_heads},
          {"n_kv_heads", m.n_kv_heads},
          {"multiple_of", m.multiple_of},
          {"ffn_dim_multiplier", m.ffn_dim_multiplier ? nlohmann::json(*m.ffn_dim_multiplier) : nlohmann::json()},
          {"ffn_hidden_dim", m.ffn_hidden_dim()},
          {"norm_eps", m.norm_eps},
          {"rope_theta", m.rope_theta},
          {"max_seq_len", m.max_seq_len},
          {"tie_embeddings", m.tie_embeddings}};
}

ModelConfig model_config_from_json(const nlohmann::json& m, const std::string& where) {
  try {
    ModelConfig c;
    c.name = m.at("name").get<std::string>();
    c.vocab_size = m.at("vocab_size").get<int64_t>();
    c.dim = m.at("dim").get<int64_t>();
    c.n_layers = m.at("n_layers").get<int64_t>();
    c.n_heads = m.at("n_heads").get<int64_t>();
    c.n_kv_heads = m.at("n_kv_heads").get<int64_t>();
    c.multiple_of = m.at("multiple_of").get<int64_t>();
    if (!m.at("ffn_dim_multiplier").is_null()) c.ffn_dim_multiplier = m.at("ffn_dim_multiplier").get<double>();
    c.norm_eps = m.at("norm_eps").get<double>();
    c.rope_theta = m.at("rope_theta").get<double>();
    c.max_seq_len = m.at("max_seq_len").get<int64_t>();
    c.tie_embeddings = m.at("tie_embeddings").get<bool>();
    return c;
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError(fmt::format("{}: the \"model\" entry is incomplete ({})", where, e.what()));
  }
}

ModelConfig model_config_from(const LlamaShape& s) {
  ModelConfig c;
  c.vocab_size = s.vocab_size;
  c.dim = s.dim;
  c.n_layers = s.n_layers;
  c.n_heads = s.n_heads;
  c.n_kv_heads = s.n_kv_heads;
  c.norm_eps = s.norm_eps;
  c.rope_theta = s.rope_theta;
  c.max_seq_len = s.max_seq_len;
  c.tie_embeddings = s.tie_embeddings;
  // Meta's width: multiple_of * ceil(m * int(8 dim / 3) / multiple_of). multiple_of = the HF
  // width reproduces it exactly; a width below int(8 dim / 3) also needs the multiplier.
  c.multiple_of = s.ffn_hidden_dim;
  const int64_t base = 2 * (4 * s.dim) / 3;
  if (s.ffn_hidden_dim < base) c.ffn_dim_multiplier = static_cast<double>(s.ffn_hidden_dim) / base;
  if (c.ffn_hidden_dim() != s.ffn_hidden_dim) {
    throw CheckpointError(fmt::format("intermediate_size {} cannot be expressed as a SwiGLU width "
                                      "of dim {}",
                                      s.ffn_hidden_dim, s.dim));
  }
  return c;
}

std::vector<std::string> hf_model_overrides(const std::string& dir) {
  const ModelConfig c = model_config_from(hf_shape(dir));
  std::vector<std::string> out = {
      fmt::format("model.vocab_size={}", c.vocab_size), fmt::format("model.dim={}", c.dim),
      fmt::format("model.n_layers={}", c.n_layers),     fmt::format("model.n_heads={}", c.n_heads),
      fmt::format("model.n_kv_heads={}", c.n_kv_heads), fmt::format("model.multiple_of={}", c.multiple_of),
      fmt::format("model.norm_eps={}", c.norm_eps),     fmt::format("model.rope_theta={}", c.rope_theta),
      fmt::format("model.max_seq_len={}", c.max_seq_len),
      fmt::format("model.tie_embeddings={}", c.tie_embeddings ? "true" : "false")};
  out.push_back(c.ffn_dim_multiplier ? fmt::format("model.ffn_dim_multiplier={}", *c.ffn_dim_multiplier)
                                     : "model.ffn_dim_multiplier=null");
  return out;
}

ModelSource load_model_source(const std::string& given) {
  // A Hub spec is resolved to its snapshot in the HF cache; progress goes to stderr, so that
  // stdout carries only the command's own output.
  const std::string path = resolve_model_path(given, nullptr, [](const std::string& line) {
    fmt::print(stderr, "{}\n", line);
    std::fflush(stderr);
  });
  const std::string named = path == given ? path : fmt::format("{} ({})", given, path);
  ModelSource source;
  std::vector<TensorPiece> pieces;
  if (is_peft_adapter_dir(path)) {
    // base_model_name_or_path (a directory or a Hub spec) with the adapter merged in, as PEFT's
    // merge_and_unload computes it: W + scale·(B @ A), the same as a merged export.
    const std::string base_given = peft_base(path);
    if (base_given.empty()) {
      throw CheckpointError(fmt::format("PEFT adapter {}: adapter_config.json names no base_model_name_or_path\n"
                                        "HINT: write the base model's directory or Hub id there",
                                        named));
    }
    const std::string base = resolve_model_path(base_given, nullptr, [](const std::string& line) {
      fmt::print(stderr, "{}\n", line);
      std::fflush(stderr);
    });
    if (!is_hf_model_dir(base)) {
      throw CheckpointError(fmt::format("PEFT adapter {}: its base {} is no Hugging Face model directory",
                                        named, base_given));
    }
    ConverterConfig lora = peft_converter_config(path);
    const Converters converters({lora});
    source.config = model_config_from(hf_shape(base));
    Llama adapted(source.config, &converters);
    adapted.materialize(at::kCPU);
    std::vector<TensorPiece> all = state_pieces(adapted, nullptr, 0, 1, PieceUse::kLoad);
    std::vector<TensorPiece> base_pieces;
    for (const TensorPiece& p : all) {
      if (!converters.owned(p.key)) base_pieces.push_back(p);
    }
    load_hf_model(base, source.config, base_pieces);
    std::set<std::string> loaded = load_peft_adapter(path, source.config, converters, lora, all);
    for (const TensorPiece& p : base_pieces) loaded.insert(p.key);
    adapted.initialize(0, loaded);  // adapter keys it lacks: B = 0, no effect
    const StateDict merged = converters.export_view(adapted.parameters());
    source.model = std::make_unique<Llama>(source.config);
    source.model->materialize(at::kCPU);
    {
      at::NoGradGuard no_grad;
      for (const auto& [fqn, t] : merged) source.model->parameters().at(fqn).copy_(t);
    }
    pieces = state_pieces(*source.model, nullptr, 0, 1, PieceUse::kLoad);
    if (fs::exists(fs::path(base) / "tokenizer.model")) source.tokenizer = (fs::path(base) / "tokenizer.model").string();
    source.description = fmt::format("PEFT adapter {} on {}", named, base_given);
  } else if (is_hf_model_dir(path)) {
    source.config = model_config_from(hf_shape(path));
    source.model = std::make_unique<Llama>(source.config);
    source.model->materialize(at::kCPU);
    pieces = state_pieces(*source.model, nullptr, 0, 1, PieceUse::kLoad);
    load_hf_model(path, source.config, pieces);
    if (fs::exists(fs::path(path) / "tokenizer.model")) source.tokenizer = (fs::path(path) / "tokenizer.model").string();
    source.description = fmt::format("Hugging Face model {}", named);
  } else {
    const std::optional<std::string> dir = find_checkpoint(path);
    if (!dir) {
      throw CheckpointError(fmt::format("{} holds no committed Strata checkpoint and is no Hugging "
                                        "Face model directory\nHINT: give a checkpoint folder, a "
                                        "step-NNNNNNN directory or an HF model directory",
                                        named));
    }
    const CheckpointReader reader(*dir);
    source.config = model_config_from_json(reader.metadata().value("model", nlohmann::json()),
                                           *dir + "/metadata.json");
    source.step = reader.step();
    // The run's config (saved with the checkpoint) names its tokenizer and its converters.
    std::optional<Config> run;
    std::string config_problem = "it has no config.yaml";
    const fs::path config_yaml = fs::path(*dir) / "config.yaml";
    if (fs::exists(config_yaml)) {
      try {
        run = load_config(config_yaml.string(), {});
      } catch (const ConfigError& e) {
        config_problem = fmt::format("its config.yaml does not load: {}", e.what());
      }
    }
    if (run && run->data.tokenizer && fs::exists(*run->data.tokenizer)) source.tokenizer = run->data.tokenizer;
    // A converter run's checkpoint holds its keys too (LoRA factors): the model as it trained,
    // with every converter's transform applied (LoRA merged in).
    std::vector<ConverterConfig> saved = run ? run->converters : std::vector<ConverterConfig>();
    for (ConverterConfig& c : saved) c.export_mode = "merged";
    const Converters converters(saved);
    Llama trained(source.config, &converters);
    trained.materialize(at::kCPU);
    std::vector<TensorPiece> all = state_pieces(trained, nullptr, 0, 1, PieceUse::kLoad);
    std::vector<TensorPiece> present, base;
    for (const TensorPiece& p : all) {
      if (reader.contains(p.key)) {
        present.push_back(p);
      } else if (!converters.owned(p.key)) {
        base.push_back(p);
      }
    }
    // Every tensor of the checkpoint has a place in the model, and every base tensor is there
    // (an adapter-only checkpoint takes them from its recorded base below).
    std::set<std::string> placed;
    for (const TensorPiece& p : present) placed.insert(p.key);
    std::vector<std::string> unplaced, absent;
    for (const std::string& key : reader.keys()) {
      if (key.rfind("optimizer.", 0) != 0 && !placed.count(key)) unplaced.push_back(key);
    }
    if (!reader.metadata().contains("adapter_only")) {
      for (const TensorPiece& p : base) absent.push_back(p.key);
    }
    if (!unplaced.empty() || !absent.empty()) {
      throw CheckpointError(fmt::format(
          "Strata checkpoint {} does not fit the model its metadata describes{}{}\nHINT: {}",
          *dir, unplaced.empty() ? "" : fmt::format("\n  tensors the model lacks: {}", fmt::join(unplaced, ", ")),
          absent.empty() ? "" : fmt::format("\n  missing: {}", fmt::join(absent, ", ")),
          run ? "the checkpoint may be damaged (strata inspect --verify)"
              : "the converters that made these tensors are named in the run's config.yaml, and " + config_problem));
    }
    reader.load(present);
    std::set<std::string> filled;
    for (const TensorPiece& p : present) filled.insert(p.key);
    // An adapter-only checkpoint: the base weights come from the bases it recorded, verified.
    if (reader.metadata().contains("adapter_only") && !base.empty()) {
      for (const nlohmann::json& recorded : reader.metadata()["adapter_only"].at("bases")) {
        const std::string given = recorded.at("source");
        const std::string base_dir = resolve_model_path(given, nullptr, [](const std::string& line) {
          fmt::print(stderr, "{}\n", line);
        });
        const std::optional<std::string> step_dir = is_hf_model_dir(base_dir) ? std::nullopt : find_checkpoint(base_dir);
        if (source_fingerprint(step_dir.value_or(base_dir)) != recorded.at("fingerprint").get<std::string>()) {
          throw CheckpointError(fmt::format("adapter-only checkpoint {} was saved on base {}, which has changed since "
                                            "(another fingerprint)\nHINT: restore the original base model",
                                            *dir, given));
        }
        if (is_hf_model_dir(base_dir)) {
          load_hf_model(base_dir, source.config, base);
        } else {
          if (!step_dir) throw CheckpointError(fmt::format("base {} of {} is no model directory", given, *dir));
          const CheckpointReader base_reader(*step_dir);
          base_reader.load(base);
        }
        for (const TensorPiece& p : base) filled.insert(p.key);
        break;  // the base keys come from one source
      }
    }
    trained.initialize(0, filled);
    source.model = std::make_unique<Llama>(source.config);
    source.model->materialize(at::kCPU);
    {
      at::NoGradGuard no_grad;
      for (const auto& [fqn, t] : converters.export_view(trained.parameters())) source.model->parameters().at(fqn).copy_(t);
    }
    pieces = state_pieces(*source.model, nullptr, 0, 1, PieceUse::kLoad);
    source.description = fmt::format("Strata checkpoint {} (step {})", *dir, source.step);
  }
  std::set<std::string> loaded;
  for (const TensorPiece& p : pieces) loaded.insert(p.key);
  source.model->initialize(0, loaded);  // only the RoPE tables: every parameter was loaded
  return source;
}

std::pair<double, int64_t> evaluate_tokens(const LanguageModel& model, const std::string& pattern,
                                           int64_t seq_len, int64_t max_tokens, int64_t batch) {
  at::NoGradGuard no_grad;
  const TokenDataset data(pattern, seq_len, model.config().vocab_size);
  int64_t windows = data.num_sequential_windows();
  if (max_tokens > 0) windows = std::min(windows, max_tokens / seq_len);
  double sum = 0.0;
  int64_t tokens = 0;
  for (int64_t first = 0; first < windows; first += batch) {
    const TokenBatch b = data.sequential_batch(first, std::min(batch, windows - first));
    at::Tensor inputs = at::from_blob(const_cast<int64_t*>(b.inputs.data()), {b.batch, b.seq_len}, at::kLong);
    at::Tensor targets = at::from_blob(const_cast<int64_t*>(b.targets.data()), {b.batch, b.seq_len}, at::kLong);
    at::Tensor logits = model.forward(inputs.clone());
    at::Tensor losses = at::cross_entropy_loss(logits.flatten(0, 1).to(at::kDouble), targets.flatten(),
                                               {}, at::Reduction::Sum);
    sum += losses.item<double>();
    tokens += b.batch * b.seq_len;
  }
  return {tokens > 0 ? sum / static_cast<double>(tokens) : 0.0, tokens};
}

}  // namespace strata
