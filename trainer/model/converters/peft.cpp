// PEFT LoRA adapter directories: recognising one, its LoRA settings and base, and loading its
// factors into a run's LoRA converter.
#include "trainer/model/converters/peft.h"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>

#include "checkpoint/json_file.h"
#include "checkpoint/safetensors.h"

namespace strata {
namespace {

nlohmann::json read_adapter_config(const std::string& dir) {
  const std::string path = (std::filesystem::path(dir) / "adapter_config.json").string();
  return read_json_file(path);
}

}  // namespace

bool is_peft_adapter_dir(const std::string& path) {
  namespace fs = std::filesystem;
  return fs::exists(fs::path(path) / "adapter_config.json") &&
         fs::exists(fs::path(path) / "adapter_model.safetensors");
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
    throw CheckpointError(
        fmt::format("{}: {}\nHINT: Strata loads plain LoRA adapters (no DoRA, biases, "
                    "rank/alpha patterns or regex targets)",
                    where, what));
  };
  if (c.value("peft_type", "") != "LORA")
    return fail(
        fmt::format("peft_type is {}, not LORA", c.value("peft_type", nlohmann::json()).dump()));
  if (c.value("use_dora", false)) return fail("use_dora is true");
  if (c.value("bias", "none") != "none")
    return fail(fmt::format("bias is '{}'", c.value("bias", "")));
  if (c.value("fan_in_fan_out", false)) return fail("fan_in_fan_out is true");
  for (const char* pattern : {"rank_pattern", "alpha_pattern"}) {
    if (c.contains(pattern) && !c[pattern].is_null() && !c[pattern].empty())
      return fail(fmt::format("{} is not empty", pattern));
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
    return fail(
        fmt::format("r, lora_alpha, lora_dropout or use_rslora has the wrong type: {}", e.what()));
  }
  std::map<std::string, std::string> ours;  // q_proj -> wq, ...
  for (const std::string& linear : block_linears()) {
    const std::string module = LlamaStateDictAdapter::hf_module(linear);
    ours[module.substr(module.find('.') + 1)] = linear;
  }
  const nlohmann::json targets = c.value("target_modules", nlohmann::json());
  out.target_modules.clear();
  if (targets.is_string() && targets.get<std::string>() == "all-linear") {
    out.target_modules = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"};
  } else if (targets.is_array()) {
    for (const nlohmann::json& t : targets) {
      std::string name = t.is_string() ? t.get<std::string>() : "";
      if (const size_t dot = name.rfind('.'); dot != std::string::npos) name = name.substr(dot + 1);
      const auto it = ours.find(name);
      if (it == ours.end())
        return fail(fmt::format("target module {} is not a Llama block linear", t.dump()));
      if (std::find(out.target_modules.begin(), out.target_modules.end(), it->second) ==
          out.target_modules.end()) {
        out.target_modules.push_back(it->second);
      }
    }
  } else {
    return fail(
        fmt::format("target_modules {} is neither a list nor \"all-linear\"", targets.dump()));
  }
  if (out.target_modules.empty()) return fail("target_modules is empty");
  return out;
}

std::set<std::string> load_peft_adapter(const std::string& dir, const ModelConfig& model,
                                        const Converters& converters, const ConverterConfig& run,
                                        std::vector<TensorPiece>& pieces) {
  const ConverterConfig theirs = peft_converter_config(dir);
  std::vector<std::string> differences;
  if (theirs.rank != run.rank)
    differences.push_back(
        fmt::format("r = {} but the run's LoRA rank is {}", theirs.rank, run.rank));
  if (theirs.alpha != run.alpha)
    differences.push_back(
        fmt::format("lora_alpha = {} but the run's alpha is {}", theirs.alpha, run.alpha));
  if (theirs.use_rslora != run.use_rslora) {
    differences.push_back(
        fmt::format("use_rslora = {} but the run's is {}", theirs.use_rslora, run.use_rslora));
  }
  for (const std::string& t : theirs.target_modules) {
    if (std::find(run.target_modules.begin(), run.target_modules.end(), t) ==
        run.target_modules.end()) {
      differences.push_back(fmt::format("it targets {} but the run's target_modules do not", t));
    }
  }
  if (!differences.empty()) {
    throw CheckpointError(
        fmt::format("PEFT adapter {} does not match the run's LoRA converter:\n  {}\nHINT: set "
                    "the converter's rank, alpha, use_rslora and target_modules to the "
                    "adapter's",
                    dir, fmt::join(differences, "\n  ")));
  }
  const SafetensorsFile file((std::filesystem::path(dir) / "adapter_model.safetensors").string());
  const ModelConverter* lora = nullptr;
  for (const auto& c : converters.list()) {
    if (c->state_dict_adapter() && c->name() == "lora") lora = c.get();
  }
  if (!lora)
    throw CheckpointError(
        fmt::format("{} is a LoRA adapter, but the run has no LoRA converter", dir));
  const ConverterAdapter& peft = *lora->state_dict_adapter();
  const LlamaStateDictAdapter llama(model);
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
      mismatched.push_back(fmt::format("{} is [{}] in the adapter, [{}] in the model", e.name,
                                       fmt::join(e.shape, ", "),
                                       fmt::join(by_key.at(*fqn)->shape, ", ")));
    } else {
      fqn_of[e.name] = *fqn;
    }
  }
  if (!unexpected.empty() || !mismatched.empty()) {
    std::string text;
    if (!unexpected.empty()) text += fmt::format("\n  unexpected: {}", fmt::join(unexpected, ", "));
    if (!mismatched.empty()) text += fmt::format("\n  mismatched: {}", fmt::join(mismatched, "; "));
    throw CheckpointError(
        fmt::format("PEFT adapter {} does not fit the model:{}\nHINT: check that the adapter "
                    "was trained on a Llama of this shape",
                    dir, text));
  }
  at::NoGradGuard no_grad;
  std::set<std::string> filled;
  for (const auto& [key, fqn] : fqn_of) {
    TensorPiece& piece = *by_key.at(fqn);
    const at::Tensor full =
        peft.from_file(fqn, file.tensor(key).to(at::kFloat), llama).reshape({-1});
    piece.local.copy_(full.narrow(0, piece.begin, piece.local.numel()));
    filled.insert(fqn);
  }
  return filled;
}

}  // namespace strata
