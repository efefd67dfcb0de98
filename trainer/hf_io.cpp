// HF export of the training model.
#include "trainer/hf_io.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <fnmatch.h>

#include <map>
#include <memory>

#include "checkpoint/hf_export.h"

namespace strata {
namespace {

at::ScalarType dtype_named(const std::string& name) {
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  return at::kFloat;
}

bool matches_any(const std::string& key, const std::vector<std::string>& patterns) {
  for (const std::string& p : patterns) {
    if (fnmatch(p.c_str(), key.c_str(), 0) == 0) return true;
  }
  return false;
}

}  // namespace

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
                        bool hash_thread) {
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
  auto plan = std::make_shared<HfShardPlan>(plan_hf_shards(specs, parse_byte_size(kc.hf_max_shard_size)));

  // This rank's tensors: converted, cast, and only those of the files it writes.
  auto tensors = std::make_shared<std::map<std::string, at::Tensor>>();
  auto keep = [&](const std::string& fqn, const at::Tensor& value) {
    const std::string key = adapter.hf_key(fqn);
    if (plan->owner(plan->file_of.at(key), world) != rank) return;
    (*tensors)[key] = adapter.to_hf(fqn, value.detach()).to(dtype_of(key)).contiguous().clone();
  };
  if (sharded) {
    for (const auto& unit : sharded->units()) {  // collective: every rank gathers every unit
      const std::vector<at::Tensor> views = unit->views(unit->gather());
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

}  // namespace strata
