// Config values: ranges, choices, cross-field consistency, and features not built yet. Errors
// name the key and where its value came from (file:line:col, --set, or the default).
#include <fmt/format.h>

#include <algorithm>
#include <cctype>

#include "checkpoint/hf_export.h"
#include "trainer/config/config_detail.h"

namespace strata::config_detail {
namespace {

class Validator {
 public:
  Validator(const std::map<std::string, std::string>& where, const std::string& file)
      : where_(where), file_(file) {}

  std::string at(const std::string& path) const {
    auto it = where_.find(path);
    return it != where_.end() ? it->second : "default of " + file_;
  }
  void check(bool ok, const std::string& path, const std::string& what,
             const std::string& hint = "") const {
    if (!ok) fail(fmt::format("{} {}", path, what), at(path), hint);
  }
  template <class T>
  void positive(const std::string& path, T value) const {
    check(value > 0, path, fmt::format("= {} must be positive", value));
  }
  void one_of(const std::string& path, const std::string& value,
              const std::vector<std::string>& allowed) const {
    std::string list;
    for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + a;
    check(std::find(allowed.begin(), allowed.end(), value) != allowed.end(), path,
          fmt::format("= '{}' is not one of: {}", value, list));
  }

 private:
  const std::map<std::string, std::string>& where_;
  const std::string& file_;
};

// data.train, or a weighted mixture in data.sources (each entry with its own val).
void validate_data_sources(const Validator& v, const DataConfig& d,
                           const std::map<std::string, std::string>& where,
                           const std::string& file) {
  if (d.train.empty() && d.sources.empty()) {
    if (where.count("data.train")) {
      v.check(false, "data.train", "is empty",
              "give a glob of train shards, e.g. data/train_*.bin, or a mixture in data.sources");
    }
    const auto section = where.find("data");
    fail("missing required key data.train", section != where.end() ? section->second : file,
         "add `data.train:` to the config or pass --set data.train=... (or list weighted "
         "datasets under data.sources)");
  }
  if (d.sources.empty()) return;
  v.check(d.train.empty(), "data.sources", "and data.train are both given",
          "give either data.train (one dataset) or data.sources (a weighted mixture), not both");
  v.check(!d.val, "data.val", "does not apply to data.sources",
          "give each source its own validation shards: data.sources.N.val (and data.val: null)");
  const std::string allowed = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-";
  for (size_t i = 0; i < d.sources.size(); ++i) {
    const DataSourceConfig& s = d.sources[i];
    const std::string base = fmt::format("data.sources.{}", i);
    v.check(!s.name.empty(), base + ".name", "is empty",
            fmt::format("name the source with letters, digits, '_', '.' or '-', or leave name "
                        "out for source{}",
                        i));
    v.check(
        s.name.find_first_not_of(allowed) == std::string::npos, base + ".name",
        fmt::format("= '{}' has characters other than letters, digits, '_', '.' and '-'", s.name),
        "source names become keys of metrics.jsonl and appear in the log: e.g. web, code_v2");
    for (size_t j = 0; j < i; ++j) {
      if (d.sources[j].name != s.name) continue;
      const std::string key =
          where.count(base + ".name") ? base + ".name" : fmt::format("data.sources.{}.name", j);
      v.check(false, key,
              fmt::format("'{}' names both data.sources.{} and data.sources.{}", s.name, j, i),
              "give every source its own name (unnamed sources are source<index>)");
    }
    v.check(!s.path.empty(), base + ".path", "is empty",
            "give a glob of the source's train shards, e.g. data/web/train_*.bin");
    v.check(s.weight > 0, base + ".weight", fmt::format("= {} must be positive", s.weight),
            "weights are relative: 5, 3 and 2 draw 50%, 30% and 20% of the samples");
    if (s.val) {
      v.check(!s.val->empty(), base + ".val", "is empty",
              "give a glob of the source's val shards, or null for no validation of it");
    }
  }
}

}  // namespace

void validate(const Config& c, const std::map<std::string, std::string>& where,
              const std::string& file, int world_size) {
  const Validator v(where, file);
  validate_data_sources(v, c.data, where, file);
  const ModelConfig& m = c.model;
  v.one_of("model.name", m.name, {"llama"});
  // Sizes no model uses (a typo, a missing unit) would overflow shapes long before memory runs
  // out, so sizes are capped too; the memory estimate at start-up judges the rest.
  const std::string too_large =
      fmt::format("exceeds {} (2^31), more than any model uses", kMaxModelSize);
  struct Count {
    std::string path;
    int64_t value;
    bool size;  // a size: capped at kMaxModelSize
  };
  for (const Count& n :
       std::vector<Count>{{"model.vocab_size", m.vocab_size, true},
                          {"model.dim", m.dim, true},
                          {"model.n_layers", m.n_layers, true},
                          {"model.n_heads", m.n_heads, true},
                          {"model.n_kv_heads", m.n_kv_heads, true},
                          {"model.multiple_of", m.multiple_of, true},
                          {"model.max_seq_len", m.max_seq_len, true},
                          {"data.seq_len", c.data.seq_len, true},
                          {"training.steps", c.training.steps, false},
                          {"training.global_batch_size", c.training.global_batch_size, true},
                          {"training.micro_batch_size", c.training.micro_batch_size, true},
                          {"training.eval_batches", c.training.eval_batches, false},
                          {"training.log_interval", c.training.log_interval, false}}) {
    v.positive(n.path, n.value);
    if (n.size)
      v.check(n.value <= kMaxModelSize, n.path, fmt::format("= {} {}", n.value, too_large),
              "check the value for a typo");
  }
  v.positive("model.norm_eps", m.norm_eps);
  v.positive("model.rope_theta", m.rope_theta);
  if (m.ffn_dim_multiplier) {
    v.positive("model.ffn_dim_multiplier", *m.ffn_dim_multiplier);
    v.check(*m.ffn_dim_multiplier * (8.0 * static_cast<double>(m.dim) / 3.0) <= kMaxModelSize,
            "model.ffn_dim_multiplier",
            fmt::format("= {} gives a SwiGLU width that {}", *m.ffn_dim_multiplier, too_large),
            "the width is about ffn_dim_multiplier x 8/3 x model.dim; check the value");
  }
  v.check(m.dim % m.n_heads == 0, "model.n_heads",
          fmt::format("= {} does not divide model.dim = {}", m.n_heads, m.dim),
          "choose n_heads so that dim / n_heads is an integer");
  v.check(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads",
          fmt::format("= {} does not divide model.n_heads = {}", m.n_kv_heads, m.n_heads),
          "grouped-query attention shares each key/value head among n_heads / n_kv_heads heads");
  v.check(m.head_dim() % 2 == 0, "model.n_heads",
          fmt::format("gives an odd head dimension dim / n_heads = {}", m.head_dim()),
          "RoPE rotates pairs of dimensions: dim / n_heads must be even");
  v.check(c.data.seq_len <= m.max_seq_len, "data.seq_len",
          fmt::format("= {} exceeds model.max_seq_len = {}", c.data.seq_len, m.max_seq_len));

  const TrainingConfig& t = c.training;
  v.check(t.eval_interval >= 0, "training.eval_interval", "must be >= 0 (0 disables evaluation)");
  v.check(t.grad_clip >= 0, "training.grad_clip", "must be >= 0 (0 disables clipping)");
  const int64_t per_step = t.micro_batch_size * world_size;
  v.check(t.global_batch_size % per_step == 0, "training.global_batch_size",
          fmt::format("= {} is not divisible by micro_batch_size {} x {} rank(s) = {}",
                      t.global_batch_size, t.micro_batch_size, world_size, per_step),
          "global_batch_size = micro_batch_size x gradient accumulation steps x ranks");

  const OptimizerConfig& o = c.optimizer;
  v.one_of("optimizer.name", o.name, {"adamw"});
  v.positive("optimizer.lr", o.lr);
  v.check(o.betas.size() == 2, "optimizer.betas",
          fmt::format("must have 2 entries, got {}", o.betas.size()));
  for (double b : o.betas) {
    v.check(b >= 0 && b < 1, "optimizer.betas", fmt::format("entry {} is outside [0, 1)", b));
  }
  v.positive("optimizer.eps", o.eps);
  v.check(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0");

  const LrSchedulerConfig& s = c.lr_scheduler;
  v.check(s.warmup_steps >= 0, "lr_scheduler.warmup_steps",
          fmt::format("= {} must be >= 0", s.warmup_steps));
  v.check(s.min_lr_ratio >= 0 && s.min_lr_ratio <= 1, "lr_scheduler.min_lr_ratio",
          fmt::format("= {} must be in [0, 1]", s.min_lr_ratio));

  const ParallelConfig& p = c.parallel;
  v.one_of("parallel.device", p.device, {"auto", "cpu", "cuda"});
  v.one_of("parallel.backend", p.backend, {"auto", "mpi", "nccl"});
  v.check(!(p.device == "cpu" && p.backend == "nccl"), "parallel.backend",
          "= nccl needs CUDA tensors, but parallel.device is cpu",
          "use parallel.backend: auto (MPI on CPU), or parallel.device: cuda");
  v.check(!(p.device == "cuda" && p.backend == "mpi"), "parallel.backend",
          "= mpi moves CPU tensors, but parallel.device is cuda",
          "use parallel.backend: auto (NCCL on CUDA)");
  v.one_of("parallel.fsdp.activation_checkpointing", p.fsdp.activation_checkpointing,
           {"auto", "full", "none"});
  const std::string& group_size = p.fsdp.shard_group_size;
  v.check(group_size == "world" || group_size == "node" ||
              (!group_size.empty() && group_size.size() <= 6 && group_size[0] != '0' &&
               std::all_of(group_size.begin(), group_size.end(),
                           [](unsigned char ch) { return std::isdigit(ch) != 0; })),
          "parallel.fsdp.shard_group_size",
          fmt::format("= '{}' must be world, node or a positive number of ranks", group_size));
  v.check(p.fsdp.enabled || group_size == "world", "parallel.fsdp.shard_group_size",
          fmt::format("= {} needs parallel.fsdp.enabled: true (hybrid sharding is a layout of "
                      "FSDP)",
                      group_size));
  // float16 would need loss scaling; bfloat16 has fp32's exponent range.
  const std::vector<std::string> dtypes = {"float32", "bfloat16"};
  const MixedPrecisionConfig& mp = p.fsdp.mixed_precision;
  v.one_of("parallel.fsdp.mixed_precision.param_dtype", mp.param_dtype, dtypes);
  v.one_of("parallel.fsdp.mixed_precision.reduce_dtype", mp.reduce_dtype, dtypes);
  v.check(p.fsdp.enabled || (mp.param_dtype == "float32" && mp.reduce_dtype == "float32"),
          "parallel.fsdp.mixed_precision",
          fmt::format("= {{param_dtype: {}, reduce_dtype: {}}} needs parallel.fsdp.enabled: true "
                      "(mixed precision casts in the FSDP units' gathers and reduce-scatters)",
                      mp.param_dtype, mp.reduce_dtype),
          "set parallel.fsdp.enabled: true (on one rank too), or keep float32");

  const CheckpointConfig& k = c.checkpoint;
  v.positive("checkpoint.interval", k.interval);
  v.check(k.keep_latest_k >= 0, "checkpoint.keep_latest_k",
          fmt::format("= {} must be >= 0 (0 keeps every checkpoint)", k.keep_latest_k));
  v.check(k.hf_export_interval >= 0, "checkpoint.hf_export_interval", "must be >= 0");
  v.check(k.hf_max_keep >= 0, "checkpoint.hf_max_keep",
          fmt::format("= {} must be >= 0 (0 keeps every export)", k.hf_max_keep));
  try {
    parse_byte_size(k.hf_max_shard_size);
  } catch (const std::invalid_argument& e) {
    v.check(false, "checkpoint.hf_max_shard_size",
            fmt::format("= '{}' is not a size: {}", k.hf_max_shard_size, e.what()),
            "write e.g. 5GB, 500MB or a number of bytes");
  }
  v.one_of("checkpoint.async_mode", k.async_mode, {"disabled", "async"});
  v.one_of("checkpoint.export_dtype", k.export_dtype, dtypes);
  if (k.load_step) {
    v.check(*k.load_step >= 0, "checkpoint.load_step",
            fmt::format("= {} must be >= 0", *k.load_step));
  }
  for (size_t i = 0; i < k.exclude_from_loading.size(); ++i) {
    v.one_of("checkpoint.exclude_from_loading", k.exclude_from_loading[i],
             {"optimizer", "lr_scheduler", "dataloader", "rng"});
  }

  int lora_converters = 0;
  for (size_t i = 0; i < c.converters.size(); ++i) {
    const ConverterConfig& cc = c.converters[i];
    const std::string base = fmt::format("converters.{}", i);
    v.one_of(base + ".type", cc.type, {"lora", "int8_qat"});
    v.positive(base + ".rank", cc.rank);
    v.check(cc.rank <= kMaxModelSize, base + ".rank", fmt::format("= {} {}", cc.rank, too_large),
            "a LoRA rank is at most the width of the layers it adapts");
    v.check(cc.alpha > 0, base + ".alpha", fmt::format("= {} must be positive", cc.alpha));
    v.check(cc.dropout >= 0 && cc.dropout < 1, base + ".dropout",
            fmt::format("= {} must be in [0, 1)", cc.dropout));
    v.one_of(base + ".export", cc.export_mode, {"adapter", "merged", "both"});
    v.one_of(base + ".save", cc.save, {"full", "adapter_only"});
    v.check(!cc.target_modules.empty(), base + ".target_modules",
            "must name at least one of wq wk wv wo w1 w2 w3");
    for (const std::string& m : cc.target_modules) {
      v.one_of(base + ".target_modules", m, {"wq", "wk", "wv", "wo", "w1", "w2", "w3"});
    }
    if (cc.type == "lora" && ++lora_converters == 2) {
      v.check(false, base + ".type", "= 'lora' appears twice: one LoRA converter per run",
              "list every target in one entry's target_modules");
    }
    // adapter_only saves keep the keys a converter owns and freezes the rest: only LoRA does.
    v.check(
        cc.save == "full" || cc.type == "lora", base + ".save",
        fmt::format("= adapter_only needs a converter that owns the trained keys, and {} owns none",
                    cc.type),
        "use save: full");
    // Forward computes Q(W)·x + scale·B·A·x whatever the order; the export applies transforms
    // last converter first, which gives the same weights only when LoRA comes first.
    v.check(cc.type != "lora" || i == 0 || c.converters[0].type != "int8_qat", base + ".type",
            "= lora must come before int8_qat in converters (the merged export quantises the base, "
            "then adds B·A)",
            "list lora first");
  }

  v.check(c.logging.peak_tflops >= 0, "logging.peak_tflops", "must be >= 0 (0: no MFU)");
}

}  // namespace strata::config_detail
