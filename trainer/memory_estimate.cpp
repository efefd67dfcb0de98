// Memory estimates before allocation (the formulas are in memory_estimate.h), the memory the
// machine offers, and the checks that refuse a run or a model that cannot fit.
#include "trainer/memory_estimate.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <sstream>

#include "trainer/errors.h"

namespace strata {
namespace {

using Real = long double;

Real nonnegative(Real x) {
  return std::isnan(x) ? 0 : std::max<Real>(x, 0);
}
Real real(int64_t x) {
  return nonnegative(static_cast<Real>(x));
}

// The model's sizes as reals: nothing here can overflow.
struct Shape {
  Real V, h, L, a, kv, hd, f, S;
  bool tied;
  Real lora_per_layer = 0;  // LoRA factors of one block
};

// ModelConfig::ffn_hidden_dim in real arithmetic (Meta's formula).
Real ffn_width(const ModelConfig& m) {
  Real hidden = std::floor(2 * (4 * real(m.dim)) / 3);
  if (m.ffn_dim_multiplier) {
    hidden = std::trunc(nonnegative(static_cast<Real>(*m.ffn_dim_multiplier)) * hidden);
  }
  const Real multiple = real(m.multiple_of);
  return multiple > 0 ? multiple * std::ceil(hidden / multiple) : hidden;
}

Shape shape_of(const ModelConfig& m, const std::vector<ConverterConfig>& converters) {
  Shape s{};
  s.V = real(m.vocab_size);
  s.h = real(m.dim);
  s.L = real(m.n_layers);
  s.a = std::max<Real>(real(m.n_heads), 1);
  s.kv = real(m.n_kv_heads);
  s.hd = s.h / s.a;
  s.f = ffn_width(m);
  s.S = real(m.max_seq_len);
  s.tied = m.tie_embeddings;
  for (const ConverterConfig& c : converters) {
    if (c.type != "lora") continue;  // int8_qat adds no parameters
    const Real r = real(c.rank), q = s.a * s.hd, kv = s.kv * s.hd;
    for (const std::string& t : c.target_modules) {
      const Real in_out = t == "wq"                ? s.h + q
                          : t == "wk" || t == "wv" ? s.h + kv
                          : t == "wo"              ? q + s.h
                                                   : s.h + s.f;  // w1, w3, w2
      s.lora_per_layer += r * in_out;
    }
  }
  return s;
}

Real block_parameters(const Shape& s) {
  return 2 * s.h * (s.a * s.hd) + 2 * s.h * (s.kv * s.hd) + 3 * s.h * s.f + 2 * s.h;
}
Real base_parameters(const Shape& s) {
  return s.L * block_parameters(s) + s.V * s.h * (s.tied ? 1 : 2) + s.h;
}
Real all_parameters(const Shape& s) {
  return base_parameters(s) + s.L * s.lora_per_layer;
}
Real trainable_parameters(const Shape& s) {
  return s.lora_per_layer > 0 ? s.L * s.lora_per_layer : all_parameters(s);
}
// The largest FSDP unit: the embedding (with the final norm when tied), one block, the head.
Real largest_unit(const Shape& s) {
  return std::max({s.V * s.h + (s.tied ? s.h : 0), block_parameters(s) + s.lora_per_layer,
                   s.tied ? 0 : s.V * s.h + s.h});
}

// ---- naming the keys that make an estimate large --------------------------------------------

// A key, its value, and how to shrink it to a modest reference value on a copy of the inputs.
template <class Inputs>
struct Knob {
  std::string name;
  std::string value;
  std::function<void(Inputs&)> shrink;
};

// The keys whose shrinking alone makes the estimate fit `budget`, the ones that shrink it
// most first; when none does, the ones that at least halve it; else the most effective one.
template <class Inputs>
std::vector<std::string> culprits(const Inputs& inputs, const std::vector<Knob<Inputs>>& knobs,
                                  const std::function<Real(const Inputs&)>& total, Real budget) {
  const Real now = total(inputs);
  std::vector<std::pair<Real, std::string>> shrunk;
  for (const Knob<Inputs>& knob : knobs) {
    Inputs copy = inputs;
    knob.shrink(copy);
    shrunk.emplace_back(total(copy), fmt::format("{}={}", knob.name, knob.value));
  }
  std::stable_sort(shrunk.begin(), shrunk.end(),
                   [](const auto& x, const auto& y) { return x.first < y.first; });
  std::vector<std::string> named;
  for (const Real limit : {budget, now / 2}) {
    for (const auto& [after, text] : shrunk) {
      if (after <= limit && named.size() < 4) named.push_back(text);
    }
    if (!named.empty()) return named;
  }
  if (!shrunk.empty() && shrunk.front().first < now) named.push_back(shrunk.front().second);
  return named;
}

std::string join(const std::vector<std::string>& parts, const std::string& last_separator) {
  std::string out;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (i > 0) out += i + 1 == parts.size() ? last_separator : ", ";
    out += parts[i];
  }
  return out;
}

// The key names alone: "model.n_layers=4" -> "model.n_layers".
std::vector<std::string> names_of(const std::vector<std::string>& named) {
  std::vector<std::string> out;
  for (const std::string& n : named) out.push_back(n.substr(0, n.find('=')));
  return out;
}

std::string number(Real x) {
  return fmt::format("{:.0f}", static_cast<double>(x));
}

// ---- reading the machine --------------------------------------------------------------------

// The first number in the file at `path`; nullopt when it is missing or not a number ("max").
std::optional<Real> read_number(const std::string& path) {
  std::ifstream in(path);
  std::string text;
  if (!(in >> text)) return std::nullopt;
  try {
    size_t used = 0;
    const unsigned long long value = std::stoull(text, &used);
    if (used != text.size()) return std::nullopt;
    return static_cast<Real>(value);
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

// The value of `key` in a memory.stat file; 0 when absent.
Real stat_value(const std::string& path, const std::string& key) {
  std::ifstream in(path);
  std::string name;
  for (Real value = 0; in >> name >> value;) {
    if (name == key) return value;
  }
  return 0;
}

// The room left under the memory limits of the cgroup at `leaf` and its ancestors up to
// `base` (the controller's mount point), with the file of the tightest one. Usage counts the
// page cache, of which the inactive part is reclaimed before the limit bites: it is left out.
void cgroup_room(const std::filesystem::path& base, const std::string& leaf, const char* limit_file,
                 const char* usage_file, const char* inactive_key,
                 std::optional<AvailableMemory>& best) {
  namespace fs = std::filesystem;
  fs::path relative = fs::path(leaf).relative_path();
  for (;;) {
    const fs::path dir = relative.empty() ? base : base / relative;
    const std::optional<Real> limit = read_number((dir / limit_file).string());
    // cgroup v1 writes "no limit" as a number near 2^63.
    if (limit && *limit < static_cast<Real>(1ULL << 60)) {
      const Real usage = nonnegative(read_number((dir / usage_file).string()).value_or(0) -
                                     stat_value((dir / "memory.stat").string(), inactive_key));
      const Real room = nonnegative(*limit - usage);
      if (!best || room < best->bytes) {
        best = AvailableMemory{
            room, fmt::format("the room under the cgroup limit {}", (dir / limit_file).string())};
      }
    }
    if (relative.empty()) break;
    relative = relative.parent_path();
    if (relative == relative.root_path() || relative.string() == ".") relative.clear();
  }
}

}  // namespace

// ---- estimates ------------------------------------------------------------------------------

long double MemoryEstimate::total() const {
  const Real sum = parameters + gradients + optimizer + gathered + activations + rope + staging;
  return std::isnan(sum) ? std::numeric_limits<Real>::infinity() : sum;
}

std::string MemoryEstimate::describe() const {
  std::vector<std::string> parts;
  for (const auto& [name, bytes] :
       std::vector<std::pair<const char*, Real>>{{"parameters", parameters},
                                                 {"gradients", gradients},
                                                 {"optimizer", optimizer},
                                                 {"gathered units", gathered},
                                                 {"activations", activations},
                                                 {"RoPE tables", rope},
                                                 {"async checkpoint staging", staging}}) {
    if (bytes != 0) parts.push_back(fmt::format("{} {}", name, format_bytes(bytes)));
  }
  return join(parts, ", ");
}

std::string format_bytes(long double bytes) {
  if (std::isnan(bytes)) return "an unknown amount";
  if (std::isinf(bytes)) return bytes > 0 ? "an unbounded amount" : "-an unbounded amount";
  const char* sign = bytes < 0 ? "-" : "";
  Real x = std::fabs(bytes);
  static const char* const kUnits[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  size_t unit = 0;
  while (x >= 1024 && unit + 1 < std::size(kUnits)) x /= 1024, ++unit;
  if (unit == 0) return fmt::format("{}{:.0f} bytes", sign, static_cast<double>(x));
  if (x < 1e6) return fmt::format("{}{:.2f} {}", sign, static_cast<double>(x), kUnits[unit]);
  return fmt::format("{}{:.3g} {}", sign, static_cast<double>(x), kUnits[unit]);
}

MemoryEstimate estimate_training_memory(const Config& config, int world_size,
                                        int shard_group_size) {
  const Shape s = shape_of(config.model, config.converters);
  const Real W = std::max(world_size, 1);
  const bool sharded = world_size > 1 && config.parallel.fsdp.enabled;
  const Real share = !sharded ? 1 : shard_group_size > 0 ? std::min<Real>(shard_group_size, W) : W;
  const Real P = all_parameters(s), T = trainable_parameters(s);
  MemoryEstimate e;
  e.parameters = 4 * P / share;
  e.gradients = 4 * T / share;
  e.optimizer = 8 * T / share;
  const bool recompute = sharded && config.parallel.fsdp.activation_checkpointing != "none";
  if (sharded) e.gathered = recompute ? 8 * largest_unit(s) : 4 * P + 4 * largest_unit(s);
  const Real b = real(config.training.micro_batch_size), t = real(config.data.seq_len);
  const Real per_layer = 4 * (34 * t * b * s.h + 5 * s.a * t * t * b);
  e.activations =
      (recompute ? 4 * s.L * t * b * s.h + per_layer : s.L * per_layer) + 12 * t * b * s.V;
  e.rope = 16 * s.S * s.hd;
  if (config.checkpoint.enable && config.checkpoint.async_mode == "async") {
    e.staging = (4 * P + 8 * T) / W;
  }
  return e;
}

MemoryEstimate estimate_inference_memory(const ModelConfig& model,
                                         const std::vector<ConverterConfig>& converters,
                                         const InferenceWorkload& workload) {
  const Shape s = shape_of(model, converters);
  MemoryEstimate e;
  e.parameters = 4 * all_parameters(s) + 4 * base_parameters(s);
  e.rope = 32 * s.S * s.hd;
  const Real b = real(workload.batch);
  const Real t = workload.seq_len <= 0 ? s.S : std::min(real(workload.seq_len), s.S);
  if (b > 0) {
    e.activations =
        4 * b * t * (5 * s.h + 2 * s.kv * s.hd + 3 * s.f) + 4 * b * s.a * t * t + 8 * b * t * s.V;
  }
  return e;
}

// ---- available memory -----------------------------------------------------------------------

std::optional<AvailableMemory> available_memory(const std::string& root) {
  std::optional<AvailableMemory> best;
  std::ifstream meminfo(root + "/proc/meminfo");
  for (std::string key; meminfo >> key;) {
    Real kib = 0;
    meminfo >> kib;
    if (key == "MemAvailable:" && meminfo) best = AvailableMemory{kib * 1024, "MemAvailable"};
    meminfo.ignore(std::numeric_limits<std::streamsize>::max(), '\n');
  }
  // /proc/self/cgroup: "0::/path" (v2) and "N:controller,...:/path" (v1).
  std::ifstream cgroups(root + "/proc/self/cgroup");
  for (std::string line; std::getline(cgroups, line);) {
    const size_t first = line.find(':'), second = line.find(':', first + 1);
    if (first == std::string::npos || second == std::string::npos) continue;
    const std::string id = line.substr(0, first);
    const std::string controllers = line.substr(first + 1, second - first - 1);
    const std::string path = line.substr(second + 1);
    if (id == "0" && controllers.empty()) {
      cgroup_room(root + "/sys/fs/cgroup", path, "memory.max", "memory.current", "inactive_file",
                  best);
    }
    std::stringstream list(controllers);
    for (std::string c; std::getline(list, c, ',');) {
      if (c == "memory") {
        cgroup_room(root + "/sys/fs/cgroup/memory", path, "memory.limit_in_bytes",
                    "memory.usage_in_bytes", "total_inactive_file", best);
      }
    }
  }
  return best;
}

// ---- the checks -----------------------------------------------------------------------------

std::string check_training_memory(const Config& config, int world_size, int ranks_per_node,
                                  const std::optional<AvailableMemory>& available,
                                  int shard_group_size) {
  const MemoryEstimate e = estimate_training_memory(config, world_size, shard_group_size);
  const Real total = e.total();
  std::string line =
      fmt::format("memory: estimate {} per rank ({})", format_bytes(total), e.describe());
  if (!available) return line + "; available memory unknown: not checked";
  const int ranks = std::max(ranks_per_node, 1);
  const Real budget = available->bytes / ranks;
  const std::string offered =
      fmt::format("{} available per rank ({}, {} rank{} on this node)", format_bytes(budget),
                  available->source, ranks, ranks == 1 ? "" : "s");
  line += fmt::format("; {}; margin {}", offered, format_bytes(budget - total));
  if (config.parallel.skip_memory_check) {
    return line + " (not checked: parallel.skip_memory_check is true)";
  }
  if (total <= budget) return line;

  // Which keys make it large: each shrunk to its default on its own.
  const ModelConfig dm;
  const DataConfig dd;
  const TrainingConfig dt;
  std::vector<Knob<Config>> knobs;
  auto knob = [&](const std::string& name, int64_t value, int64_t reference,
                  std::function<void(Config&)> shrink) {
    if (value > reference) knobs.push_back({name, std::to_string(value), std::move(shrink)});
  };
  const ModelConfig& m = config.model;
  knob("model.vocab_size", m.vocab_size, dm.vocab_size,
       [&](Config& c) { c.model.vocab_size = dm.vocab_size; });
  knob("model.dim", m.dim, dm.dim, [&](Config& c) { c.model.dim = dm.dim; });
  knob("model.n_layers", m.n_layers, dm.n_layers,
       [&](Config& c) { c.model.n_layers = dm.n_layers; });
  knob("model.n_heads", m.n_heads, dm.n_heads, [&](Config& c) { c.model.n_heads = dm.n_heads; });
  knob("model.multiple_of", m.multiple_of, dm.multiple_of,
       [&](Config& c) { c.model.multiple_of = dm.multiple_of; });
  if (m.ffn_dim_multiplier && *m.ffn_dim_multiplier > 1) {
    knobs.push_back({"model.ffn_dim_multiplier", fmt::format("{}", *m.ffn_dim_multiplier),
                     [](Config& c) { c.model.ffn_dim_multiplier.reset(); }});
  }
  knob("model.max_seq_len", m.max_seq_len, dm.max_seq_len,
       [&](Config& c) { c.model.max_seq_len = dm.max_seq_len; });
  knob("data.seq_len", config.data.seq_len, dd.seq_len,
       [&](Config& c) { c.data.seq_len = dd.seq_len; });
  knob("training.micro_batch_size", config.training.micro_batch_size, dt.micro_batch_size,
       [&](Config& c) { c.training.micro_batch_size = dt.micro_batch_size; });
  for (size_t i = 0; i < config.converters.size(); ++i) {
    const ConverterConfig reference;
    knob(fmt::format("converters.{}.rank", i), config.converters[i].rank, reference.rank,
         [i, rank = reference.rank](Config& c) { c.converters[i].rank = rank; });
  }
  const std::vector<std::string> named = culprits<Config>(
      config, knobs,
      [world_size, shard_group_size](const Config& c) {
        return estimate_training_memory(c, world_size, shard_group_size).total();
      },
      budget);
  const bool can_shard = world_size == 1 || !config.parallel.fsdp.enabled;
  const bool hybrid = !can_shard && shard_group_size > 0 && shard_group_size < world_size;
  throw ConfigError(fmt::format(
      "config error: the run does not fit in memory: about {} per rank is needed, {}{}\n"
      "  estimate per rank: {}\n"
      "HINT: {}{}; if the estimate is wrong for this machine, --set "
      "parallel.skip_memory_check=true starts the run anyway",
      format_bytes(total), offered,
      named.empty() ? "" : fmt::format("; the estimate is large because of {}", join(named, ", ")),
      e.describe(),
      named.empty() ? "make the model or the micro batch smaller"
                    : fmt::format("make {} smaller", join(names_of(named), " or ")),
      can_shard ? ", or shard the model over more ranks (parallel.fsdp.enabled: true, mpirun -np N)"
      : hybrid  ? ", or shard the model over more ranks per shard group "
                  "(parallel.fsdp.shard_group_size)"
                : ", or shard the model over more ranks or nodes"));
}

ModelKeyNames hf_model_key_names(const std::string& config_json) {
  ModelKeyNames names;
  names.vocab_size = "vocab_size";
  names.dim = "hidden_size";
  names.n_layers = "num_hidden_layers";
  names.n_heads = "num_attention_heads";
  names.ffn = "intermediate_size";
  names.max_seq_len = "max_position_embeddings";
  names.file = config_json;
  return names;
}

std::string check_inference_memory(const ModelConfig& model,
                                   const std::vector<ConverterConfig>& converters,
                                   const InferenceWorkload& workload, const ModelKeyNames& names,
                                   const std::optional<AvailableMemory>& available) {
  const MemoryEstimate e = estimate_inference_memory(model, converters, workload);
  const Real total = e.total();
  std::string line = fmt::format("memory: estimate {} ({})", format_bytes(total), e.describe());
  if (!available) return line + "; available memory unknown: not checked";
  const std::string offered =
      fmt::format("{} available ({})", format_bytes(available->bytes), available->source);
  line += fmt::format("; {}; margin {}", offered, format_bytes(available->bytes - total));
  if (workload.skip_check) return line + " (not checked: --skip-memory-check)";
  if (total <= available->bytes) return line;

  using Inputs = std::pair<ModelConfig, InferenceWorkload>;
  const ModelConfig dm;
  std::vector<Knob<Inputs>> knobs;
  auto knob = [&](const std::string& name, int64_t value, int64_t reference,
                  std::function<void(Inputs&)> shrink) {
    if (value > reference) knobs.push_back({name, std::to_string(value), std::move(shrink)});
  };
  knob(names.vocab_size, model.vocab_size, dm.vocab_size,
       [&](Inputs& in) { in.first.vocab_size = dm.vocab_size; });
  knob(names.dim, model.dim, dm.dim, [&](Inputs& in) { in.first.dim = dm.dim; });
  knob(names.n_layers, model.n_layers, dm.n_layers,
       [&](Inputs& in) { in.first.n_layers = dm.n_layers; });
  knob(names.n_heads, model.n_heads, dm.n_heads,
       [&](Inputs& in) { in.first.n_heads = dm.n_heads; });
  // The SwiGLU width: Meta's default for the model's dim.
  ModelConfig default_width = model;
  default_width.multiple_of = dm.multiple_of;
  default_width.ffn_dim_multiplier.reset();
  const Real width = ffn_width(model);
  if (width > ffn_width(default_width)) {
    knobs.push_back(
        {names.ffn,
         names.ffn == "model.multiple_of" ? std::to_string(model.multiple_of) : number(width),
         [&](Inputs& in) {
           in.first.multiple_of = dm.multiple_of;
           in.first.ffn_dim_multiplier.reset();
         }});
  }
  knob(names.max_seq_len, model.max_seq_len, dm.max_seq_len,
       [&](Inputs& in) { in.first.max_seq_len = dm.max_seq_len; });
  const int64_t seq_len =
      workload.seq_len > 0 ? std::min(workload.seq_len, model.max_seq_len) : model.max_seq_len;
  if (!workload.seq_len_option.empty() && workload.batch > 0) {
    knob(workload.seq_len_option, seq_len, dm.max_seq_len,
         [&](Inputs& in) { in.second.seq_len = dm.max_seq_len; });
  }
  const std::vector<std::string> named = culprits<Inputs>(
      {model, workload}, knobs,
      [&converters](const Inputs& in) {
        return estimate_inference_memory(in.first, converters, in.second).total();
      },
      available->bytes);
  throw ConfigError(fmt::format(
      "the model does not fit in memory: about {} is needed, {}{}\n"
      "  estimate: {}\n"
      "HINT: use a smaller model{}; if the estimate is wrong for this machine, "
      "--skip-memory-check runs it anyway",
      format_bytes(total), offered,
      named.empty() ? ""
                    : fmt::format("; the estimate is large because of {}{}", join(named, ", "),
                                  names.file.empty() ? "" : " (sizes from " + names.file + ")"),
      e.describe(),
      workload.seq_len_option.empty() || workload.batch == 0
          ? ""
          : fmt::format(" or a smaller {}", workload.seq_len_option)));
}

}  // namespace strata
