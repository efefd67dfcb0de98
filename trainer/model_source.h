// A model to run (eval, generate, convert) from anything `resume_path` accepts: a Strata
// checkpoint (folder or step directory; the model config is in its metadata.json) or a Hugging
// Face model directory (the shape is in its config.json), also as a Hub spec resolved through
// the HF cache. One process, whole tensors.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "checkpoint/hf_llama.h"
#include "trainer/config.h"
#include "trainer/llama.h"

namespace strata {

struct ModelSource {
  ModelConfig config;
  std::unique_ptr<Llama> model;             // materialised on the CPU, every parameter loaded
  std::optional<std::string> tokenizer;     // tokenizer.model of the source, when it has one
  std::string description;                  // "Strata checkpoint DIR (step N)" / "HF model DIR"
  int64_t step = 0;
};

ModelSource load_model_source(const std::string& path);

// The model config as stored in checkpoint metadata ("model"), and back.
nlohmann::json model_config_json(const ModelConfig& config);
ModelConfig model_config_from_json(const nlohmann::json& model, const std::string& where);

// The ModelConfig an HF config.json shape describes (SwiGLU width reproduced exactly).
ModelConfig model_config_from(const LlamaShape& shape);

// `--set` overrides giving the model shape of the HF directory `dir` (its config.json).
std::vector<std::string> hf_model_overrides(const std::string& dir);

// Mean next-token cross-entropy (fp64 accumulation) over consecutive, non-overlapping windows
// from the start of the token file(s) `pattern`: inputs t[kT:(k+1)T], targets
// t[kT+1:(k+1)T+1], up to `max_tokens` scored tokens (0: all). Returns {loss, tokens}.
std::pair<double, int64_t> evaluate_tokens(const LanguageModel& model, const std::string& pattern,
                                           int64_t seq_len, int64_t max_tokens, int64_t batch = 8);

}  // namespace strata
