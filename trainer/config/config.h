// The job configuration: one typed struct per YAML section, loaded from YAML files with
// `--set key.path=value` overrides, validated when loaded, and written back as resolved YAML.
// Errors name the full key path and the YAML line (or the override that set it).
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "trainer/errors.h"

namespace strata {

struct JobConfig {
  std::string name = "tiny";
  std::string run_dir = "runs/tiny";
  int64_t seed = 1234;
};

// The largest model size (vocab_size, dim, n_layers, heads, widths, max_seq_len) and sequence
// or batch length a config or config.json may give: 2^31, far beyond any real model, so that
// sizes and their products in tensor shapes stay within int64.
constexpr int64_t kMaxModelSize = int64_t{1} << 31;

struct ModelConfig {
  std::string name = "llama";
  int64_t vocab_size = 2048;
  int64_t dim = 128;
  int64_t n_layers = 4;
  int64_t n_heads = 4;
  int64_t n_kv_heads = 2;
  int64_t multiple_of = 64;
  std::optional<double> ffn_dim_multiplier;  // null: Meta's default 2/3 * 4 * dim
  double norm_eps = 1.0e-5;
  double rope_theta = 10000.0;
  int64_t max_seq_len = 128;
  bool tie_embeddings = false;

  int64_t head_dim() const { return dim / n_heads; }
  // SwiGLU hidden size exactly as in Meta's reference Llama.
  int64_t ffn_hidden_dim() const;
};

// One entry of `data.sources:`, a weighted mixture of training datasets.
struct DataSourceConfig {
  std::string name;                // unique, [A-Za-z0-9_.-]; absent: source<index>
  std::string path;                // required: glob of train shards
  double weight = 0.0;             // required, > 0; relative to the other sources
  std::optional<std::string> val;  // glob of this source's val shards; null: none
};

struct DataConfig {
  std::string train;                      // glob of train shards ("": data.sources instead)
  std::optional<std::string> val;         // null: no validation
  std::vector<DataSourceConfig> sources;  // a weighted mixture instead of data.train
  std::optional<std::string> tokenizer;   // SentencePiece model; null: samples print token ids
  int64_t seq_len = 128;
  // Attention stays inside each packed document, whose RoPE positions restart at 0 (packed
  // instruction data marks where documents start); false: causal over the whole window.
  bool document_masking = false;
};

struct TrainingConfig {
  int64_t steps = 200;
  int64_t global_batch_size = 16;
  int64_t micro_batch_size = 8;
  double grad_clip = 1.0;      // <= 0 disables clipping
  int64_t eval_interval = 50;  // 0 disables periodic validation
  int64_t eval_batches = 8;
  int64_t log_interval = 10;
  bool fused_kernels = true;  // Strata's fused CPU kernels; false: the ATen composition
};

struct OptimizerConfig {
  std::string name = "adamw";
  double lr = 3.0e-3;
  std::vector<double> betas = {0.9, 0.95};
  double eps = 1.0e-8;
  double weight_decay = 0.1;
};

enum class LrDecay { kCosine, kLinear, kNone };

struct LrSchedulerConfig {
  int64_t warmup_steps = 20;
  LrDecay decay = LrDecay::kCosine;
  double min_lr_ratio = 0.1;
};

// FSDP2-style mixed precision: fp32 master weights and AdamW moments in the shards; units are
// all-gathered and compute in param_dtype; gradients are reduce-scattered in reduce_dtype.
struct MixedPrecisionConfig {
  std::string param_dtype = "float32";   // float32 | bfloat16
  std::string reduce_dtype = "float32";  // float32 | bfloat16
};

struct FsdpConfig {
  bool enabled = true;
  // auto: none when keeping activations fits comfortably in memory, else full | full | none
  std::string activation_checkpointing = "auto";
  // Ranks per shard group (hybrid sharding, parallel/shard_layout.h): world | node | N.
  std::string shard_group_size = "world";
  MixedPrecisionConfig mixed_precision;
};

struct ParallelConfig {
  std::string device = "auto";     // auto (cuda when GPUs are visible) | cpu | cuda
  std::string backend = "auto";    // auto (nccl on cuda, mpi on cpu) | mpi | nccl
  int64_t threads_per_rank = 0;    // 0 = auto: the node's cores / ranks on the node
  bool skip_memory_check = false;  // true: start even when the memory estimate does not fit
  FsdpConfig fsdp;
};

struct CheckpointConfig {
  bool enable = true;
  std::string folder = "checkpoints";    // relative paths are inside job.run_dir
  int64_t interval = 100;                // full checkpoint every `interval` steps
  std::string async_mode = "disabled";   // disabled | async
  int64_t keep_latest_k = 3;             // committed step dirs kept (0: all)
  bool model_only = false;               // interval saves hold weights only
  bool last_save_model_only = true;      // the final step's save: weights only, in export_dtype
  bool last_save_in_hf = true;           // HF export (hf-NNNNNNN/) at the last step
  std::string export_dtype = "float32";  // model-only saves and HF exports
  std::vector<std::string> export_fp32_keys;  // HF key patterns (fnmatch) kept in float32
  int64_t hf_export_interval = 0;             // 0: HF exports only at the last step
  int64_t hf_max_keep = 2;                    // committed hf-* dirs kept (0: all)
  std::string hf_max_shard_size = "5GB";
  std::optional<std::string> resume_path;
  bool resume_model_only = false;
  std::optional<int64_t> load_step;  // null: the latest committed step
  std::vector<std::string> additional_load_paths;
  std::vector<std::string> exclude_from_loading;  // optimizer, lr_scheduler, dataloader, rng
};

// One entry of `converters:`: `lora` (low-rank adapters on the block linears, base frozen)
// or `int8_qat` (weight-only int8 fake quantisation of the block linears).
struct ConverterConfig {
  std::string type;
  int64_t rank = 8;      // lora: r
  double alpha = 16.0;   // lora: scaling alpha / r (alpha / sqrt(r) with use_rslora)
  double dropout = 0.0;  // lora: dropout on the adapter's input while training
  bool use_rslora = false;
  std::vector<std::string> target_modules = {"wq", "wv"};  // block linears: wq wk wv wo w1 w2 w3
  std::string export_mode = "adapter";  // YAML key: export. lora: adapter | merged | both
  std::string save = "full";            // lora: interval checkpoints hold full | adapter_only
};

struct LoggingConfig {
  std::string metrics_file = "metrics.jsonl";
  double peak_tflops = 0.0;  // 0: MFU is not reported
};

struct Config {
  JobConfig job;
  ModelConfig model;
  DataConfig data;
  TrainingConfig training;
  OptimizerConfig optimizer;
  LrSchedulerConfig lr_scheduler;
  ParallelConfig parallel;
  CheckpointConfig checkpoint;
  std::vector<ConverterConfig> converters;
  LoggingConfig logging;
};

// Loads `path` (YAML), applies `overrides` ("a.b.c=value", value parsed as YAML), checks
// every key, type and range, and cross-checks values that depend on each other. `world_size`
// is the number of ranks the job runs on (global batch divisibility). `model_defaults`, when
// given, replaces the built-in defaults of the model keys (an HF resume_path's shape).
// Throws ConfigError naming the key path and its source line.
Config load_config(const std::string& path, const std::vector<std::string>& overrides,
                   int world_size = 1, const ModelConfig* model_defaults = nullptr);

// The same from YAML text; `source_name` is what messages call the text (e.g. a file name).
Config parse_config(const std::string& yaml_text, const std::string& source_name,
                    const std::vector<std::string>& overrides, int world_size = 1,
                    const ModelConfig* model_defaults = nullptr);

// True when the YAML file at `path` or an override sets any model.* key. Without one, a run
// whose resume_path is an HF model takes the model from that model's config.json.
bool config_sets_model(const std::string& path, const std::vector<std::string>& overrides);

// The model config as JSON (checkpoint metadata "model"; the HF config.json mapping starts
// from it), generated from the config schema: every model key, plus the derived
// "ffn_hidden_dim". Reading back requires every key; errors name `where`.
nlohmann::json model_config_json(const ModelConfig& config);
ModelConfig model_config_from_json(const nlohmann::json& model, const std::string& where);

// The resolved configuration as YAML, every key present, in schema order. Loading it back
// gives an identical Config.
std::string to_yaml(const Config& config);

}  // namespace strata
