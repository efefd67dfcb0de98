// HF export of the training model.
#include "trainer/hf_io.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fnmatch.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>

#include "checkpoint/file_io.h"
#include "checkpoint/hf_export.h"
#include "checkpoint/hub_spec.h"
#include "checkpoint/safetensors.h"
#include "trainer/converter.h"

namespace strata {
namespace {


bool matches_any(const std::string& key, const std::vector<std::string>& patterns) {
  for (const std::string& p : patterns) {
    if (fnmatch(p.c_str(), key.c_str(), 0) == 0) return true;
  }
  return false;
}

}  // namespace

at::ScalarType dtype_named(const std::string& name) {
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  return at::kFloat;
}

LlamaShape llama_shape(const ModelConfig& c) {
  LlamaShape s;
  s.vocab_size = c.vocab_size;
  s.dim = c.dim;
  s.n_layers = c.n_layers;
  s.n_heads = c.n_heads;
  s.n_kv_heads = c.n_kv_heads;
  s.ffn_hidden_dim = c.ffn_hidden_dim();
  s.max_seq_len = c.max_seq_len;
  s.norm_eps = c.norm_eps;
  s.rope_theta = c.rope_theta;
  s.tie_embeddings = c.tie_embeddings;
  return s;
}

CommitJob hf_export_job(int64_t step, const Llama* plain, const ShardedLlama* sharded,
                        const Config& config, const Tokenizer* tokenizer, int rank, int world,
                        bool hash_thread, const std::map<std::string, std::string>* source_layout,
                        const std::string& source_base) {
  const CheckpointConfig& kc = config.checkpoint;
  const LlamaStateDictAdapter adapter(llama_shape(config.model));
  const at::ScalarType export_dtype = dtype_named(kc.export_dtype);
  auto dtype_of = [&](const std::string& hf_key) {
    return matches_any(hf_key, kc.export_fp32_keys) ? at::kFloat : export_dtype;
  };

  // The export view (docs/architecture.md: every converter's state_dict_transform, last first): its
  // converter-owned keys leave through their converter's adapter, the rest through the Llama
  // adapter. The plan comes from names and shapes alone (the view of the meta parameters), in
  // HF order (the model's parameter order).
  const Llama& names = sharded ? sharded->meta_model() : *plain;
  const Converters* converters = names.converters();
  auto export_view = [&](const StateDict& sd) { return converters ? converters->export_view(sd) : sd; };
  std::vector<HfTensorSpec> specs;
  std::map<std::string, const ConverterAdapter*> adapter_of;  // owned key -> its adapter
  for (const auto& [fqn, param] : export_view(names.parameters())) {
    if (const ModelConverter* owner = converters ? converters->owner(fqn) : nullptr) {
      if (!owner->state_dict_adapter()) {
        throw CheckpointError(fmt::format("converter {} leaves {} in the export and has no state_dict_adapter to "
                                          "write it", owner->name(), fqn));
      }
      adapter_of[fqn] = owner->state_dict_adapter();
      continue;
    }
    const std::string key = adapter.hf_key(fqn);
    specs.push_back({key, param.sizes().vec(), dtype_of(key)});
  }
  auto plan = std::make_shared<HfShardPlan>();
  try {
    if (!source_layout || source_layout->empty()) throw CheckpointError("no source layout");
    *plan = plan_from_weight_map(*source_layout, specs);
  } catch (const CheckpointError&) {  // none, or other keys (e.g. a tied source): fresh shards
    *plan = plan_hf_shards(specs, parse_byte_size(kc.hf_max_shard_size));
  }

  // This rank's tensors: converted, cast, and only those of the files it writes (converter
  // adapters' files: rank 0).
  auto tensors = std::make_shared<std::map<std::string, at::Tensor>>();
  // adapter -> its file's tensors, by file key
  auto adapter_tensors = std::make_shared<std::map<const ConverterAdapter*, std::map<std::string, at::Tensor>>>();
  auto keep = [&](const std::string& fqn, const at::Tensor& value) {
    if (const auto owned = adapter_of.find(fqn); owned != adapter_of.end()) {
      if (rank != 0) return;
      (*adapter_tensors)[owned->second][owned->second->to_file_key(fqn)] =
          owned->second->to_file(fqn, value.detach(), adapter).to(export_dtype).contiguous().clone();
      return;
    }
    const std::string key = adapter.hf_key(fqn);
    if (plan->owner(plan->file_of.at(key), world) != rank) return;
    (*tensors)[key] = adapter.to_hf(fqn, value.detach()).to(dtype_of(key)).contiguous().clone();
  };
  if (sharded) {
    for (const auto& unit : sharded->units()) {  // collective: every rank gathers every unit
      // A unit holds whole block linears, so the converters' transforms apply unit by unit.
      const std::vector<at::Tensor> views = unit->gather_views();
      StateDict sd;
      for (size_t i = 0; i < views.size(); ++i) sd.insert(unit->params()[i].fqn, views[i]);
      for (const auto& [fqn, value] : export_view(sd)) keep(fqn, value);
    }
  } else {
    for (const auto& [fqn, value] : export_view(plain->parameters())) keep(fqn, value);
  }


  const int64_t bos = tokenizer ? tokenizer->bos_id() : 1;
  const int64_t eos = tokenizer ? tokenizer->eos_id() : 2;
  auto model_config = std::make_shared<nlohmann::ordered_json>(adapter.config_json(kc.export_dtype, bos, eos));
  std::map<std::string, std::string> text_files;
  std::vector<std::string> copy_files;
  if (tokenizer && config.data.tokenizer) {
    copy_files.push_back(*config.data.tokenizer);
    nlohmann::ordered_json special;
    special["bos_token"] = "<s>";
    special["eos_token"] = "</s>";
    special["unk_token"] = "<unk>";
    // With tokenizer.json (the same BPE for the `tokenizers` library) transformers loads the
    // tokenizer as that file says, with no SentencePiece or protobuf, and encodes exactly as
    // SentencePiece does: control pieces written in the text are text ("<s>" is not BOS), and
    // a text starting with a space still gets the dummy prefix (LlamaTokenizer's Metaspace
    // pre-tokenizer would drop it). A tokenizer it cannot express keeps the LlamaTokenizer
    // (SentencePiece) route.
    const std::optional<std::string> fast = tokenizer->hf_tokenizer_json();
    nlohmann::ordered_json tc;
    tc["tokenizer_class"] = fast ? "PreTrainedTokenizerFast" : "LlamaTokenizer";
    tc["add_bos_token"] = true;
    tc["add_eos_token"] = false;
    tc["bos_token"] = "<s>";
    tc["eos_token"] = "</s>";
    tc["unk_token"] = "<unk>";
    tc["pad_token"] = nullptr;
    tc["clean_up_tokenization_spaces"] = false;
    if (fast) {
      tc["split_special_tokens"] = true;
      text_files["tokenizer.json"] = *fast;
    } else {
      tc["legacy"] = true;
      tc["sp_model_kwargs"] = nlohmann::ordered_json::object();
    }
    tc["model_max_length"] = config.model.max_seq_len;
    text_files["special_tokens_map.json"] = special.dump(2) + "\n";
    text_files["tokenizer_config.json"] = tc.dump(2) + "\n";
  }
  CommitJob job;
  job.step = step;
  job.write_rank = [plan, tensors, adapter_tensors, rank, world, hash_thread](const std::string& dir) {
    nlohmann::json report = write_hf_shards(dir, *plan, rank, world, *tensors, hash_thread);
    for (const auto& [converter_adapter, files] : *adapter_tensors) {
      const std::filesystem::path sub = std::filesystem::path(dir) / converter_adapter->subdirectory();
      std::filesystem::create_directories(sub);
      std::vector<SafetensorsItem> items;
      for (const auto& [key, t] : files) items.push_back({key, t.scalar_type(), t.sizes().vec(), t.data_ptr()});
      write_safetensors_file((sub / converter_adapter->weights_file()).string(), items, {{"format", "pt"}}, hash_thread);
    }
    return report;
  };
  // Adapters' configs name their base: the export itself when its weights are the adapter's
  // base, else the run's source model.
  std::vector<std::pair<std::string, std::string>> adapter_configs;  // relative path, content
  std::vector<const ConverterAdapter*> on_export;
  for (const auto& [converter_adapter, files] : *adapter_tensors) {
    const bool base_is_export = converter_adapter->base_is_export();
    adapter_configs.emplace_back(
        (std::filesystem::path(converter_adapter->subdirectory()) / converter_adapter->config_file()).string(),
        base_is_export ? "" : converter_adapter->config_json(source_base).dump(2) + "\n");
    on_export.push_back(converter_adapter);
  }
  job.finalize = [plan, model_config, bos, eos, text_files, copy_files, adapter_configs, on_export](
                     const std::string& dir, const std::vector<nlohmann::json>&) {
    write_hf_shared_files(dir, *plan, *model_config,
                          LlamaStateDictAdapter::generation_config_json(bos, eos), text_files, copy_files);
    // `dir` is the export's .incomplete directory; the adapter names the committed one.
    std::string final_dir = std::filesystem::absolute(dir).lexically_normal().string();
    const std::string suffix = ".incomplete";
    if (final_dir.size() > suffix.size() && final_dir.compare(final_dir.size() - suffix.size(), suffix.size(), suffix) == 0) {
      final_dir.resize(final_dir.size() - suffix.size());
    }
    for (size_t i = 0; i < adapter_configs.size(); ++i) {
      const std::string content = !adapter_configs[i].second.empty()
                                      ? adapter_configs[i].second
                                      : on_export[i]->config_json(final_dir).dump(2) + "\n";
      write_file_atomic((std::filesystem::path(dir) / adapter_configs[i].first).string(), content);
    }
  };
  return job;
}

std::map<std::string, std::string> hf_weight_map(const std::string& dir) {
  std::map<std::string, std::string> out;
  const std::filesystem::path path = std::filesystem::path(dir) / "model.safetensors.index.json";
  if (!std::filesystem::exists(path)) return out;
  std::ifstream in(path);
  try {
    const nlohmann::json index = nlohmann::json::parse(in);
    for (const auto& [key, file] : index.at("weight_map").items()) out[key] = file.get<std::string>();
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError(fmt::format("{}/model.safetensors.index.json has no valid weight_map: {}", dir, e.what()));
  }
  return out;
}

LlamaShape hf_shape(const std::string& dir) {
  const std::string path = (std::filesystem::path(dir) / "config.json").string();
  std::ifstream in(path);
  if (!in) throw CheckpointError(fmt::format("cannot read {}", path));
  nlohmann::json config;
  try {
    config = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError(fmt::format("{} is not valid JSON: {}", path, e.what()));
  }
  return LlamaStateDictAdapter::shape_from_config(config, path);
}

bool is_hf_model_dir(const std::string& path) {
  namespace fs = std::filesystem;
  return fs::exists(fs::path(path) / "config.json") &&
         (fs::exists(fs::path(path) / "model.safetensors") ||
          fs::exists(fs::path(path) / "model.safetensors.index.json"));
}

void load_hf_model(const std::string& dir, const ModelConfig& model, std::vector<TensorPiece>& pieces) {
  namespace fs = std::filesystem;
  const fs::path root(dir);
  const LlamaShape theirs = hf_shape(dir);
  const LlamaShape ours = llama_shape(model);
  std::vector<std::string> differences;
  auto compare = [&](const char* name, auto a, auto b, const char* hf_name) {
    if (a != b) differences.push_back(fmt::format("model.{} = {} but {} = {}", name, a, hf_name, b));
  };
  compare("vocab_size", ours.vocab_size, theirs.vocab_size, "vocab_size");
  compare("dim", ours.dim, theirs.dim, "hidden_size");
  compare("n_layers", ours.n_layers, theirs.n_layers, "num_hidden_layers");
  compare("n_heads", ours.n_heads, theirs.n_heads, "num_attention_heads");
  compare("n_kv_heads", ours.n_kv_heads, theirs.n_kv_heads, "num_key_value_heads");
  compare("ffn_hidden_dim()", ours.ffn_hidden_dim, theirs.ffn_hidden_dim, "intermediate_size");
  compare("norm_eps", ours.norm_eps, theirs.norm_eps, "rms_norm_eps");
  compare("rope_theta", ours.rope_theta, theirs.rope_theta, "rope_theta");
  if (ours.tie_embeddings && !theirs.tie_embeddings) {
    differences.push_back("model.tie_embeddings = true but tie_word_embeddings = false");
  }
  if (!differences.empty()) {
    throw CheckpointError(fmt::format("{} holds another model shape than this run's:\n  {}\nHINT: set "
                                      "the model keys to match its config.json",
                                      dir, fmt::join(differences, "\n  ")));
  }

  // Which file holds each tensor.
  std::map<std::string, std::string> file_of = hf_weight_map(dir);
  if (!fs::exists(root / "model.safetensors.index.json")) {
    const SafetensorsFile single((root / "model.safetensors").string());
    for (const SafetensorsEntry& e : single.header().entries) file_of[e.name] = "model.safetensors";
  }
  std::map<std::string, std::unique_ptr<SafetensorsFile>> files;
  auto open = [&](const std::string& key) -> const SafetensorsFile& {
    const std::string& name = file_of.at(key);
    auto& f = files[name];
    if (!f) f = std::make_unique<SafetensorsFile>((root / name).string());
    return *f;
  };

  const LlamaStateDictAdapter adapter(ours);
  std::vector<std::string> missing, mismatched, unexpected;
  std::set<std::string> used;
  for (const TensorPiece& piece : pieces) {
    std::string key = adapter.hf_key(piece.key);
    if (!file_of.count(key) && piece.key == "output.weight" && theirs.tie_embeddings) {
      key = "model.embed_tokens.weight";  // a tied source: the embedding is the output
    }
    if (!file_of.count(key)) {
      missing.push_back(key);
      continue;
    }
    used.insert(key);
    const SafetensorsEntry& entry = open(key).entry(key);
    if (entry.shape != piece.shape) {
      mismatched.push_back(fmt::format("{} is [{}] in the directory, [{}] in the model", key,
                                       fmt::join(entry.shape, ", "), fmt::join(piece.shape, ", ")));
    }
  }
  for (const auto& [key, file] : file_of) {
    if (used.count(key) || key.find("rotary_emb.inv_freq") != std::string::npos) continue;
    if (key == "lm_head.weight" && ours.tie_embeddings) continue;
    unexpected.push_back(key);
  }
  if (!missing.empty() || !mismatched.empty() || !unexpected.empty()) {
    std::string text;
    if (!missing.empty()) text += fmt::format("\n  missing: {}", fmt::join(missing, ", "));
    if (!unexpected.empty()) text += fmt::format("\n  unexpected: {}", fmt::join(unexpected, ", "));
    if (!mismatched.empty()) text += fmt::format("\n  mismatched: {}", fmt::join(mismatched, "; "));
    throw CheckpointError(fmt::format("{} does not fit the model:{}\nHINT: check that the directory "
                                      "holds a LlamaForCausalLM of this shape",
                                      dir, text));
  }

  at::NoGradGuard no_grad;
  for (TensorPiece& piece : pieces) {
    const int64_t count = piece.local.numel();
    if (count == 0) continue;
    std::string key = adapter.hf_key(piece.key);
    if (!file_of.count(key)) key = "model.embed_tokens.weight";
    const SafetensorsFile& file = open(key);
    if (!LlamaStateDictAdapter::permuted(piece.key)) {
      piece.local.copy_(file.read_elements(key, piece.begin, count));
      continue;
    }
    // wq / wk: read the whole heads the range lies in, convert them, keep the range.
    const int64_t cols = piece.shape[1], head_elems = ours.head_dim() * cols;
    const int64_t first_head = piece.begin / head_elems;
    const int64_t end_head = (piece.begin + count + head_elems - 1) / head_elems;
    const at::Tensor slab = file.read_elements(key, first_head * head_elems, (end_head - first_head) * head_elems)
                                .view({(end_head - first_head) * ours.head_dim(), cols});
    piece.local.copy_(adapter.from_hf(piece.key, slab).reshape({-1}).narrow(0, piece.begin - first_head * head_elems, count));
  }
}

}  // namespace strata

namespace strata {
namespace {

nlohmann::json read_adapter_config(const std::string& dir) {
  const std::string path = (std::filesystem::path(dir) / "adapter_config.json").string();
  std::ifstream in(path);
  if (!in) throw CheckpointError(fmt::format("cannot read {}", path));
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError(fmt::format("{} is not valid JSON: {}", path, e.what()));
  }
}

}  // namespace

bool is_peft_adapter_dir(const std::string& path) {
  namespace fs = std::filesystem;
  return fs::exists(fs::path(path) / "adapter_config.json") && fs::exists(fs::path(path) / "adapter_model.safetensors");
}

std::string peft_base(const std::string& dir) {
  const nlohmann::json config = read_adapter_config(dir);
  const nlohmann::json base = config.value("base_model_name_or_path", nlohmann::json());
  return base.is_string() ? base.get<std::string>() : "";
}

ConverterConfig peft_converter_config(const std::string& dir) {
  const std::string where = (std::filesystem::path(dir) / "adapter_config.json").string();
  const nlohmann::json c = read_adapter_config(dir);
  auto fail = [&](const std::string& what) -> ConverterConfig {
    throw CheckpointError(fmt::format("{}: {}\nHINT: Strata loads plain LoRA adapters (no DoRA, biases, "
                                      "rank/alpha patterns or regex targets)",
                                      where, what));
  };
  if (c.value("peft_type", "") != "LORA") return fail(fmt::format("peft_type is {}, not LORA", c.value("peft_type", nlohmann::json()).dump()));
  if (c.value("use_dora", false)) return fail("use_dora is true");
  if (c.value("bias", "none") != "none") return fail(fmt::format("bias is '{}'", c.value("bias", "")));
  if (c.value("fan_in_fan_out", false)) return fail("fan_in_fan_out is true");
  for (const char* pattern : {"rank_pattern", "alpha_pattern"}) {
    if (c.contains(pattern) && !c[pattern].is_null() && !c[pattern].empty()) return fail(fmt::format("{} is not empty", pattern));
  }
  ConverterConfig out;
  out.type = "lora";
  out.export_mode = "merged";
  try {
    out.rank = c.value("r", int64_t{8});
    out.alpha = c.value("lora_alpha", 8.0);
    out.dropout = c.value("lora_dropout", 0.0);
    out.use_rslora = c.value("use_rslora", false);
  } catch (const nlohmann::json::exception& e) {
    return fail(fmt::format("r, lora_alpha, lora_dropout or use_rslora has the wrong type: {}", e.what()));
  }
  static const std::map<std::string, std::string> ours = {{"q_proj", "wq"}, {"k_proj", "wk"},    {"v_proj", "wv"},
                                                          {"o_proj", "wo"}, {"gate_proj", "w1"}, {"down_proj", "w2"},
                                                          {"up_proj", "w3"}};
  const nlohmann::json targets = c.value("target_modules", nlohmann::json());
  out.target_modules.clear();
  if (targets.is_string() && targets.get<std::string>() == "all-linear") {
    out.target_modules = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"};
  } else if (targets.is_array()) {
    for (const nlohmann::json& t : targets) {
      std::string name = t.is_string() ? t.get<std::string>() : "";
      if (const size_t dot = name.rfind('.'); dot != std::string::npos) name = name.substr(dot + 1);
      const auto it = ours.find(name);
      if (it == ours.end()) return fail(fmt::format("target module {} is not a Llama block linear", t.dump()));
      if (std::find(out.target_modules.begin(), out.target_modules.end(), it->second) == out.target_modules.end()) {
        out.target_modules.push_back(it->second);
      }
    }
  } else {
    return fail(fmt::format("target_modules {} is neither a list nor \"all-linear\"", targets.dump()));
  }
  if (out.target_modules.empty()) return fail("target_modules is empty");
  return out;
}

std::set<std::string> load_peft_adapter(const std::string& dir, const ModelConfig& model,
                                        const Converters& converters, const ConverterConfig& run,
                                        std::vector<TensorPiece>& pieces) {
  const ConverterConfig theirs = peft_converter_config(dir);
  std::vector<std::string> differences;
  if (theirs.rank != run.rank) differences.push_back(fmt::format("r = {} but the run's LoRA rank is {}", theirs.rank, run.rank));
  if (theirs.alpha != run.alpha) differences.push_back(fmt::format("lora_alpha = {} but the run's alpha is {}", theirs.alpha, run.alpha));
  if (theirs.use_rslora != run.use_rslora) {
    differences.push_back(fmt::format("use_rslora = {} but the run's is {}", theirs.use_rslora, run.use_rslora));
  }
  for (const std::string& t : theirs.target_modules) {
    if (std::find(run.target_modules.begin(), run.target_modules.end(), t) == run.target_modules.end()) {
      differences.push_back(fmt::format("it targets {} but the run's target_modules do not", t));
    }
  }
  if (!differences.empty()) {
    throw CheckpointError(fmt::format("PEFT adapter {} does not match the run's LoRA converter:\n  {}\nHINT: set "
                                      "the converter's rank, alpha, use_rslora and target_modules to the "
                                      "adapter's",
                                      dir, fmt::join(differences, "\n  ")));
  }
  const SafetensorsFile file((std::filesystem::path(dir) / "adapter_model.safetensors").string());
  const ModelConverter* lora = nullptr;
  for (const auto& c : converters.list()) {
    if (c->state_dict_adapter() && c->name() == "lora") lora = c.get();
  }
  if (!lora) throw CheckpointError(fmt::format("{} is a LoRA adapter, but the run has no LoRA converter", dir));
  const ConverterAdapter& peft = *lora->state_dict_adapter();
  const LlamaStateDictAdapter llama(llama_shape(model));
  std::map<std::string, TensorPiece*> by_key;
  for (TensorPiece& piece : pieces) {
    if (converters.owner(piece.key) == lora) by_key[piece.key] = &piece;
  }
  std::vector<std::string> unexpected, mismatched;
  std::map<std::string, std::string> fqn_of;  // file key -> fqn
  for (const SafetensorsEntry& e : file.header().entries) {
    const std::optional<std::string> fqn = peft.from_file_key(e.name);
    if (!fqn || !by_key.count(*fqn)) {
      unexpected.push_back(e.name);
    } else if (e.shape != by_key.at(*fqn)->shape) {
      mismatched.push_back(fmt::format("{} is [{}] in the adapter, [{}] in the model", e.name, fmt::join(e.shape, ", "),
                                       fmt::join(by_key.at(*fqn)->shape, ", ")));
    } else {
      fqn_of[e.name] = *fqn;
    }
  }
  if (!unexpected.empty() || !mismatched.empty()) {
    std::string text;
    if (!unexpected.empty()) text += fmt::format("\n  unexpected: {}", fmt::join(unexpected, ", "));
    if (!mismatched.empty()) text += fmt::format("\n  mismatched: {}", fmt::join(mismatched, "; "));
    throw CheckpointError(fmt::format("PEFT adapter {} does not fit the model:{}\nHINT: check that the adapter "
                                      "was trained on a Llama of this shape",
                                      dir, text));
  }
  at::NoGradGuard no_grad;
  std::set<std::string> filled;
  for (const auto& [key, fqn] : fqn_of) {
    TensorPiece& piece = *by_key.at(fqn);
    const at::Tensor full = peft.from_file(fqn, file.tensor(key).to(at::kFloat), llama).reshape({-1});
    piece.local.copy_(full.narrow(0, piece.begin, piece.local.numel()));
    filled.insert(fqn);
  }
  return filled;
}

}  // namespace strata
