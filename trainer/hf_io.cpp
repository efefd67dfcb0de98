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

#include "checkpoint/hf_export.h"
#include "checkpoint/safetensors.h"

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
                        bool hash_thread, const std::map<std::string, std::string>* source_layout) {
  const CheckpointConfig& kc = config.checkpoint;
  const LlamaStateDictAdapter adapter(llama_shape(config.model));
  const at::ScalarType export_dtype = dtype_named(kc.export_dtype);
  auto dtype_of = [&](const std::string& hf_key) {
    return matches_any(hf_key, kc.export_fp32_keys) ? at::kFloat : export_dtype;
  };

  // The plan from names and shapes alone, in HF order (the model's parameter order).
  const Llama& names = sharded ? sharded->meta_model() : *plain;
  std::vector<HfTensorSpec> specs;
  for (const auto& [fqn, param] : names.parameters()) {
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

  // This rank's tensors: converted, cast, and only those of the files it writes.
  auto tensors = std::make_shared<std::map<std::string, at::Tensor>>();
  auto keep = [&](const std::string& fqn, const at::Tensor& value) {
    const std::string key = adapter.hf_key(fqn);
    if (plan->owner(plan->file_of.at(key), world) != rank) return;
    (*tensors)[key] = adapter.to_hf(fqn, value.detach()).to(dtype_of(key)).contiguous().clone();
  };
  if (sharded) {
    for (const auto& unit : sharded->units()) {  // collective: every rank gathers every unit
      const std::vector<at::Tensor> views = unit->gather_views();
      for (size_t i = 0; i < views.size(); ++i) keep(unit->params()[i].fqn, views[i]);
    }
  } else {
    for (const auto& [fqn, param] : plain->parameters()) keep(fqn, param);
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
    nlohmann::ordered_json tc;
    tc["tokenizer_class"] = "LlamaTokenizer";
    tc["add_bos_token"] = true;
    tc["add_eos_token"] = false;
    tc["bos_token"] = "<s>";
    tc["eos_token"] = "</s>";
    tc["unk_token"] = "<unk>";
    tc["pad_token"] = nullptr;
    tc["clean_up_tokenization_spaces"] = false;
    tc["legacy"] = true;
    tc["model_max_length"] = config.model.max_seq_len;
    tc["sp_model_kwargs"] = nlohmann::ordered_json::object();
    text_files["special_tokens_map.json"] = special.dump(2) + "\n";
    text_files["tokenizer_config.json"] = tc.dump(2) + "\n";
  }
  CommitJob job;
  job.step = step;
  job.write_rank = [plan, tensors, rank, world, hash_thread](const std::string& dir) {
    return write_hf_shards(dir, *plan, rank, world, *tensors, hash_thread);
  };
  job.finalize = [plan, model_config, bos, eos, text_files, copy_files](
                     const std::string& dir, const std::vector<nlohmann::json>&) {
    write_hf_shared_files(dir, *plan, *model_config,
                          LlamaStateDictAdapter::generation_config_json(bos, eos), text_files, copy_files);
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
