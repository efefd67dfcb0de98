// Every source of model weights, and the one loader for all of them (docs/architecture.md
// "Resume and loading"): a Strata checkpoint (folder or step directory), a Hugging Face model
// directory, a PEFT LoRA adapter with its base, an adapter-only checkpoint with its verified
// bases, each also as a Hub spec resolved through the HF cache. Training (resume_path,
// additional_load_paths) and eval / generate / convert load through the same functions.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "checkpoint/sharded_checkpoint.h"
#include "parallel/communicator.h"
#include "trainer/config/config.h"
#include "trainer/memory_estimate.h"
#include "trainer/model/converters/converter.h"
#include "trainer/model/llama.h"

namespace strata {

struct WeightSource {
  enum class Kind { kStrata, kHf, kPeft };
  std::string given;  // as the config or command line names it
  std::string dir;    // local directory (a step directory for kStrata)
  Kind kind = Kind::kHf;
};
const char* kind_name(WeightSource::Kind kind);  // "Strata checkpoint", ...

// Maps a path as the config writes it (a directory or a Hub spec) to its local directory.
using LocalDir = std::function<std::string(const std::string&)>;

// What `dir` holds: a PEFT adapter (checked first: an export with the adapter beside its base
// is both), an HF model, or a Strata checkpoint (its step directory, `load_step` or the
// latest). Throws CheckpointError naming `role` and `given` when it is none of them.
WeightSource classify_source(const std::string& given, const std::string& dir,
                             std::optional<int64_t> load_step, const std::string& role);

// The sources `given` stands for, in loading order: a PEFT adapter is its base (the HF model
// base_model_name_or_path names) then the adapter; an adapter-only Strata checkpoint is itself
// then its recorded bases, each verified against its fingerprint; anything else is itself.
std::vector<WeightSource> expand_source(const std::string& given, const LocalDir& local_dir,
                                        std::optional<int64_t> load_step, const std::string& role);

// adapter-only checkpoints (a converter with `save: adapter_only`) record the bases they apply
// to: each with a fingerprint of its files (SHA-256 over names, sizes and contents of its
// *.safetensors and *.json). The recorded bases of the checkpoint `step_dir`, verified (throws
// CheckpointError when a base changed); empty for a checkpoint that is not adapter-only.
std::string source_fingerprint(const std::string& dir);
std::vector<WeightSource> adapter_only_bases(const std::string& step_dir,
                                             const LocalDir& local_dir);

// What the sources fill: this rank's pieces of the model's parameters (whole tensors or
// shards), the run's converters (their keys come from sources that have them, else the
// initialiser) and its converter configs (a PEFT adapter needs the run's LoRA).
struct WeightTarget {
  const ModelConfig* model = nullptr;
  const Converters* converters = nullptr;
  const std::vector<ConverterConfig>* converter_configs = nullptr;
  std::function<std::vector<TensorPiece>()> pieces;
};

// Loads `sources` in order into `target`, on every rank of `comm` (null: this process alone),
// agreeing on failures. Each source fills the keys it has (an HF model: every parameter the
// converters do not own; a PEFT adapter: the LoRA factors; a Strata checkpoint: what it
// holds); a key that two sources provide, counting those in `provider` already, is an error
// naming both. `provider` gains parameter -> source; `log` gets one line per source.
void load_weight_sources(const std::vector<WeightSource>& sources, const WeightTarget& target,
                         std::map<std::string, std::string>& provider, Communicator* comm,
                         const std::function<void(const std::string&)>& log);

// A model to run (eval, generate, convert) from anything resume_path accepts. One process,
// whole tensors, every converter folded in (LoRA merged as PEFT's merge_and_unload does).
// Before building it, the model and `workload` are checked against the memory available
// (check_inference_memory): a ConfigError names the sizes that do not fit.
struct ModelSource {
  ModelConfig config;
  std::unique_ptr<Llama> model;          // materialised on the CPU, every parameter loaded
  std::optional<std::string> tokenizer;  // tokenizer.model of the source, when it has one
  std::string description;  // "Strata checkpoint DIR (step N)" / "Hugging Face model DIR"
  int64_t step = 0;
};
ModelSource load_model_source(const std::string& given, const InferenceWorkload& workload = {});

}  // namespace strata
