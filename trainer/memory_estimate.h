// Memory estimates made from the configuration alone, before anything is allocated: what one
// rank of a training run, or one process running a model (eval, generate, convert), will
// hold, compared with the memory the machine and its cgroup have available. Sizes are computed
// in long double, so an absurd config gives a huge estimate (or infinity), never an overflow.
//
// Training, per rank (fp32 everywhere; W ranks; P parameters, T of them trainable: all, or
// the LoRA factors alone; b = training.micro_batch_size, s = data.seq_len, h = model.dim,
// a = model.n_heads, L = model.n_layers, V = model.vocab_size, S = model.max_seq_len,
// hd = h / a):
//   parameters  4 P / W with FSDP (W > 1), else 4 P
//   gradients   4 T / W with FSDP, else 4 T
//   optimizer   8 T / W with FSDP, else 8 T (AdamW's two moments)
//   gathered    FSDP only: the largest unit U (embedding, one block, or the head) gathered with
//               its full gradient, 8 U; when activations are kept (activation_checkpointing:
//               none) every unit stays gathered from forward to backward: 4 P + 4 U
//   activations per layer, Megatron's s b h (34 + 5 a s / h) bytes at 16 bits, times 2 for
//               fp32 and 2 for unfused attention: A = 4 s b h (34 + 5 a s / h). Kept (one rank,
//               replicated, or FSDP with none): L A; recomputed (FSDP with full or auto, which
//               falls back to full): each unit's input, 4 L s b h, plus one unit's A. Plus the
//               logits and their gradient, 12 s b V
//   rope        the RoPE tables: 16 S hd (angles, cos and sin in fp64 while building, then fp32)
//   staging     async checkpoints: a copy of the rank's share of the state, (4 P + 8 T) / W
//
// Inference (eval, generate, convert: one process, no gradients):
//   parameters  4 P with the converters, plus 4 P of the model with them folded in (both are
//               alive while the converters are folded)
//   rope        two sets of tables, 32 S hd
//   activations one forward pass of b sequences of s tokens without gradients: the working set
//               of one layer, 4 b s (5 h + 2 kv hd + 3 f) with f the SwiGLU width and kv the
//               key/value heads, the attention probabilities 4 b a s^2, and the logits with
//               their log-softmax, 8 b s V
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "trainer/config/config.h"

namespace strata {

// Bytes, by what holds them.
struct MemoryEstimate {
  long double parameters = 0;
  long double gradients = 0;
  long double optimizer = 0;
  long double gathered = 0;
  long double activations = 0;
  long double rope = 0;
  long double staging = 0;

  // The sum; +infinity when a part is not a number (an infinite size times zero).
  long double total() const;
  // "parameters 1.50 GiB, gradients 1.50 GiB, ..." (the parts that are not zero).
  std::string describe() const;
};

// "12.0 KiB", "3.25 GiB", "1.2e+15 TiB" (binary units).
std::string format_bytes(long double bytes);

// One rank of `config` on `world_size` ranks, FSDP sharding over `shard_group_size` of them
// (hybrid sharding; 0: all).
MemoryEstimate estimate_training_memory(const Config& config, int world_size,
                                        int shard_group_size = 0);

// What eval, generate and convert run: `batch` sequences of `seq_len` tokens per forward pass.
struct InferenceWorkload {
  int64_t batch = 0;    // 0: no forward pass (convert)
  int64_t seq_len = 0;  // 0, or more than the model's max_seq_len: max_seq_len
  // What messages call the option that sets seq_len (e.g. "--seq-len"); empty: none.
  std::string seq_len_option;
  bool skip_check = false;  // --skip-memory-check
};
MemoryEstimate estimate_inference_memory(const ModelConfig& model,
                                         const std::vector<ConverterConfig>& converters,
                                         const InferenceWorkload& workload);

// Memory this process may still use: MemAvailable of /proc/meminfo, or the room left under a
// cgroup memory limit of this process (v2 memory.max, v1 memory.limit_in_bytes, less the
// group's usage; ancestors included) when that is less. `root` prefixes /proc and /sys (tests).
// nullopt where neither can be read (not Linux).
struct AvailableMemory {
  long double bytes = 0;
  std::string source;  // "MemAvailable", "the cgroup limit of /sys/fs/cgroup/..."
};
std::optional<AvailableMemory> available_memory(const std::string& root = "");

// Training: the estimate for one rank against `available` shared by `ranks_per_node` ranks.
// Returns the start-up log line (estimate, available, margin). Throws ConfigError when the
// estimate exceeds the rank's share, naming the keys that make it large (key=value) and
// parallel.skip_memory_check; with that key true, or without `available`, it only reports.
std::string check_training_memory(const Config& config, int world_size, int ranks_per_node,
                                  const std::optional<AvailableMemory>& available,
                                  int shard_group_size = 0);

// What messages call the model's fields: the config schema's keys (a Strata checkpoint's
// metadata) or config.json's (a Hugging Face model), and the file they come from.
struct ModelKeyNames {
  std::string vocab_size = "model.vocab_size";
  std::string dim = "model.dim";
  std::string n_layers = "model.n_layers";
  std::string n_heads = "model.n_heads";
  std::string ffn = "model.multiple_of";  // the SwiGLU width
  std::string max_seq_len = "model.max_seq_len";
  std::string file;  // e.g. "step-0000100/metadata.json"; empty: the config
};
ModelKeyNames hf_model_key_names(const std::string& config_json);

// Eval, generate, convert: the same check for one process running `model`. Returns a one-line
// summary; throws ConfigError naming `names` and the workload's option when it cannot fit.
std::string check_inference_memory(const ModelConfig& model,
                                   const std::vector<ConverterConfig>& converters,
                                   const InferenceWorkload& workload, const ModelKeyNames& names,
                                   const std::optional<AvailableMemory>& available);

}  // namespace strata
