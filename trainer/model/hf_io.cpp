// HF export of the training model.
#include "trainer/model/hf_io.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fnmatch.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>

#include "checkpoint/file_io.h"
#include "checkpoint/hf_export.h"
#include "checkpoint/json_file.h"
#include "checkpoint/safe_path.h"
#include "checkpoint/hub/spec.h"
#include "checkpoint/safetensors.h"
#include "trainer/errors.h"
#include "trainer/model/converters/converter.h"

namespace strata {
namespace {

bool matches_any(const std::string& key, const std::vector<std::string>& patterns) {
  for (const std::string& p : patterns) {
    if (fnmatch(p.c_str(), key.c_str(), 0) == 0) return true;
  }
  return false;
}

// The tokenizer files of an HF export beside tokenizer.model: special_tokens_map.json,
// tokenizer_config.json and, when the tokenizer can be expressed as one, tokenizer.json.
std::map<std::string, std::string> hf_tokenizer_files(const Tokenizer& tokenizer,
                                                      int64_t max_seq_len) {
  std::map<std::string, std::string> text_files;
  if (tokenizer.is_tokenizer_json()) {
    // A Hugging Face tokenizer: its own files, as they are.
    text_files["tokenizer.json"] = *tokenizer.hf_tokenizer_json();
    const std::filesystem::path dir = std::filesystem::path(tokenizer.path()).parent_path();
    for (const char* name : {"tokenizer_config.json", "special_tokens_map.json"}) {
      std::error_code ec;
      if (!std::filesystem::is_regular_file(dir / name, ec)) continue;
      std::ifstream in(dir / name, std::ios::binary);
      std::ostringstream bytes;
      bytes << in.rdbuf();
      if (!in) throw DataError(fmt::format("cannot read {}", (dir / name).string()));
      text_files[name] = bytes.str();
    }
    return text_files;
  }
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
  const std::optional<std::string> fast = tokenizer.hf_tokenizer_json();
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
  tc["model_max_length"] = max_seq_len;
  text_files["special_tokens_map.json"] = special.dump(2) + "\n";
  text_files["tokenizer_config.json"] = tc.dump(2) + "\n";
  return text_files;
}

// The export's shard files: the layout of the HF directory the run started from when its
// weight_map names exactly these tensors, else fresh shards of at most `max_shard_size`.
HfShardPlan export_shard_plan(const std::vector<HfTensorSpec>& specs,
                              const std::map<std::string, std::string>* source_layout,
                              const std::string& max_shard_size) {
  if (source_layout && !source_layout->empty()) {
    try {
      return plan_from_weight_map(*source_layout, specs);
    } catch (const CheckpointError&) {  // other keys (e.g. a tied source): fresh shards
    }
  }
  return plan_hf_shards(specs, parse_byte_size(max_shard_size));
}

// The committed directory an export's `<dir>.incomplete` becomes (absolute): what an adapter
// written inside it names as its base.
std::string committed_dir(const std::string& dir) {
  std::string out = std::filesystem::absolute(dir).lexically_normal().string();
  const std::string suffix = ".incomplete";
  if (out.size() > suffix.size() &&
      out.compare(out.size() - suffix.size(), suffix.size(), suffix) == 0) {
    out.resize(out.size() - suffix.size());
  }
  return out;
}

}  // namespace

at::ScalarType dtype_named(const std::string& name) {
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  return at::kFloat;
}

CommitJob hf_export_job(int64_t step, const Llama* plain, const ShardedLlama* sharded,
                        const Config& config, const Tokenizer* tokenizer, int rank, int world,
                        bool hash_thread, const std::map<std::string, std::string>* source_layout,
                        const std::string& source_base) {
  const CheckpointConfig& kc = config.checkpoint;
  const LlamaStateDictAdapter adapter(config.model);
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
  auto export_view = [&](const StateDict& sd) {
    return converters ? converters->export_view(sd) : sd;
  };
  std::vector<HfTensorSpec> specs;
  std::map<std::string, const ConverterAdapter*> adapter_of;  // owned key -> its adapter
  for (const auto& [fqn, param] : export_view(names.parameters())) {
    if (const ModelConverter* owner = converters ? converters->owner(fqn) : nullptr) {
      if (!owner->state_dict_adapter()) {
        throw CheckpointError(
            fmt::format("converter {} leaves {} in the export and has no state_dict_adapter to "
                        "write it",
                        owner->name(), fqn));
      }
      adapter_of[fqn] = owner->state_dict_adapter();
      continue;
    }
    const std::string key = adapter.hf_key(fqn);
    specs.push_back({key, param.sizes().vec(), dtype_of(key)});
  }
  auto plan =
      std::make_shared<HfShardPlan>(export_shard_plan(specs, source_layout, kc.hf_max_shard_size));

  // This rank's tensors: converted, cast, and only those of the files it writes (converter
  // adapters' files: rank 0).
  auto tensors = std::make_shared<std::map<std::string, at::Tensor>>();
  // adapter -> its file's tensors, by file key
  auto adapter_tensors =
      std::make_shared<std::map<const ConverterAdapter*, std::map<std::string, at::Tensor>>>();
  auto keep = [&](const std::string& fqn, const at::Tensor& value) {
    if (const auto owned = adapter_of.find(fqn); owned != adapter_of.end()) {
      if (rank != 0) return;
      (*adapter_tensors)[owned->second][owned->second->to_file_key(fqn)] =
          owned->second->to_file(fqn, value.detach(), adapter)
              .to(at::kCPU, export_dtype)
              .contiguous()
              .clone();
      return;
    }
    const std::string key = adapter.hf_key(fqn);
    if (plan->owner(plan->file_of.at(key), world) != rank) return;
    (*tensors)[key] =
        adapter.to_hf(fqn, value.detach()).to(at::kCPU, dtype_of(key)).contiguous().clone();
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
  auto model_config =
      std::make_shared<nlohmann::ordered_json>(adapter.config_json(kc.export_dtype, bos, eos));
  std::map<std::string, std::string> text_files;  // name -> content
  std::vector<std::string> copy_files;
  if (tokenizer && config.data.tokenizer) {
    if (!tokenizer->is_tokenizer_json()) copy_files.push_back(tokenizer->path());
    text_files = hf_tokenizer_files(*tokenizer, config.model.max_seq_len);
  }
  CommitJob job;
  job.step = step;
  job.write_rank = [plan, tensors, adapter_tensors, rank, world,
                    hash_thread](const std::string& dir) {
    nlohmann::json report = write_hf_shards(dir, *plan, rank, world, *tensors, hash_thread);
    for (const auto& [converter_adapter, files] : *adapter_tensors) {
      const std::filesystem::path sub =
          std::filesystem::path(dir) / converter_adapter->subdirectory();
      std::filesystem::create_directories(sub);
      std::vector<SafetensorsItem> items;
      for (const auto& [key, t] : files)
        items.push_back({key, t.scalar_type(), t.sizes().vec(), t.data_ptr()});
      write_safetensors_file((sub / converter_adapter->weights_file()).string(), items,
                             {{"format", "pt"}}, hash_thread);
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
        (std::filesystem::path(converter_adapter->subdirectory()) /
         converter_adapter->config_file())
            .string(),
        base_is_export ? "" : converter_adapter->config_json(source_base).dump(2) + "\n");
    on_export.push_back(converter_adapter);
  }
  job.finalize = [plan, model_config, bos, eos, text_files, copy_files, adapter_configs, on_export](
                     const std::string& dir, const std::vector<nlohmann::json>&) {
    write_hf_shared_files(dir, *plan, *model_config,
                          LlamaStateDictAdapter::generation_config_json(bos, eos), text_files,
                          copy_files);
    const std::string final_dir = committed_dir(dir);
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
  const std::string path = (std::filesystem::path(dir) / "model.safetensors.index.json").string();
  if (!std::filesystem::exists(path)) return out;
  const nlohmann::json index = read_json_file(path);
  const auto map = index.is_object() ? index.find("weight_map") : index.end();
  if (map == index.end() || !map->is_object())
    throw CheckpointError(
        fmt::format("{} has no \"weight_map\" object\nHINT: the model "
                    "directory is damaged; download or export it again",
                    path));
  for (const auto& [key, file] : map->items()) {
    if (!file.is_string())
      throw CheckpointError(
          fmt::format("{}: weight_map[\"{}\"] is not a file name ({})", path, key, file.dump()));
    // Only names of files inside the directory (the Hub cache's links into blobs/ allowed).
    path_inside(dir, file.get<std::string>(), fmt::format("{}: weight_map[\"{}\"]", path, key),
                confinement_root(dir));
    out[key] = file.get<std::string>();
  }
  return out;
}

ModelConfig hf_model_config(const std::string& dir) {
  const std::string path = (std::filesystem::path(dir) / "config.json").string();
  return LlamaStateDictAdapter::model_config_from_hf(read_json_file(path), path);
}

bool is_hf_model_dir(const std::string& path) {
  namespace fs = std::filesystem;
  return fs::exists(fs::path(path) / "config.json") &&
         (fs::exists(fs::path(path) / "model.safetensors") ||
          fs::exists(fs::path(path) / "model.safetensors.index.json"));
}

void load_hf_model(const std::string& dir, const ModelConfig& model,
                   std::vector<TensorPiece>& pieces) {
  namespace fs = std::filesystem;
  const fs::path root(dir);
  const ModelConfig theirs = hf_model_config(dir);
  const std::vector<std::string> differences = LlamaStateDictAdapter::differences(model, theirs);
  if (!differences.empty()) {
    throw CheckpointError(
        fmt::format("{} holds another model shape than this run's:\n  {}\nHINT: set "
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
    // A name from the index is confined to the directory (hf_weight_map did the same); the
    // fixed model.safetensors is opened as it is, like the other fixed names.
    if (!f)
      f = std::make_unique<SafetensorsFile>(
          name == "model.safetensors"
              ? (root / name).string()
              : path_inside(dir, name, fmt::format("{}: tensor file", dir), confinement_root(dir)));
    return *f;
  };

  const LlamaStateDictAdapter adapter(model);
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
    if (key == "lm_head.weight" && model.tie_embeddings) continue;
    unexpected.push_back(key);
  }
  if (!missing.empty() || !mismatched.empty() || !unexpected.empty()) {
    std::string text;
    if (!missing.empty()) text += fmt::format("\n  missing: {}", fmt::join(missing, ", "));
    if (!unexpected.empty()) text += fmt::format("\n  unexpected: {}", fmt::join(unexpected, ", "));
    if (!mismatched.empty()) text += fmt::format("\n  mismatched: {}", fmt::join(mismatched, "; "));
    throw CheckpointError(
        fmt::format("{} does not fit the model:{}\nHINT: check that the directory "
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
    const int64_t cols = piece.shape[1], head_elems = model.head_dim() * cols;
    const int64_t first_head = piece.begin / head_elems;
    const int64_t end_head = (piece.begin + count + head_elems - 1) / head_elems;
    const at::Tensor slab =
        file.read_elements(key, first_head * head_elems, (end_head - first_head) * head_elems)
            .view({(end_head - first_head) * model.head_dim(), cols});
    piece.local.copy_(adapter.from_hf(piece.key, slab)
                          .reshape({-1})
                          .narrow(0, piece.begin - first_head * head_elems, count));
  }
}

}  // namespace strata
