// Config loading: YAML + `--set` overrides -> typed structs, with every error naming the key
// path and where its value came from. The schema is written once, as `visit` functions that
// the reader and the YAML writer share. Value checks are in config_validation.cpp.
#include "trainer/config/config.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "trainer/config/config_detail.h"

namespace strata {

namespace config_detail {

void fail(const std::string& what, const std::string& where, const std::string& hint) {
  std::string message = fmt::format("config error: {} ({})", what, where);
  if (!hint.empty()) message += "\nHINT: " + hint;
  throw ConfigError(message);
}

}  // namespace config_detail

int64_t ModelConfig::ffn_hidden_dim() const {
  int64_t hidden = 2 * (4 * dim) / 3;
  if (ffn_dim_multiplier) {
    hidden = static_cast<int64_t>(*ffn_dim_multiplier * static_cast<double>(hidden));
  }
  return multiple_of * ((hidden + multiple_of - 1) / multiple_of);
}

namespace {

using config_detail::fail;

const std::vector<std::pair<std::string, LrDecay>> kDecayNames = {
    {"cosine", LrDecay::kCosine}, {"linear", LrDecay::kLinear}, {"none", LrDecay::kNone}};

// ---- the schema ---------------------------------------------------------------------------

template <class V>
void visit(V& v, JobConfig& c) {
  v.field("name", c.name);
  v.field("run_dir", c.run_dir);
  v.field("seed", c.seed);
}
template <class V>
void visit(V& v, ModelConfig& c) {
  v.field("name", c.name);
  v.field("vocab_size", c.vocab_size);
  v.field("dim", c.dim);
  v.field("n_layers", c.n_layers);
  v.field("n_heads", c.n_heads);
  v.field("n_kv_heads", c.n_kv_heads);
  v.field("multiple_of", c.multiple_of);
  v.field("ffn_dim_multiplier", c.ffn_dim_multiplier);
  v.field("norm_eps", c.norm_eps);
  v.field("rope_theta", c.rope_theta);
  v.field("max_seq_len", c.max_seq_len);
  v.field("tie_embeddings", c.tie_embeddings);
}
template <class V>
void visit(V& v, DataConfig& c) {
  v.field("train", c.train);  // this or sources: config_validation.cpp
  v.field("val", c.val);
  v.list("sources", c.sources);
  v.field("tokenizer", c.tokenizer);
  v.field("seq_len", c.seq_len);
  v.field("document_masking", c.document_masking);
}
template <class V>
void visit(V& v, DataSourceConfig& c) {
  v.field("name", c.name);
  v.field("path", c.path, /*required=*/true);
  v.field("weight", c.weight, /*required=*/true);
  v.field("val", c.val);
}
template <class V>
void visit(V& v, TrainingConfig& c) {
  v.field("steps", c.steps);
  v.field("global_batch_size", c.global_batch_size);
  v.field("micro_batch_size", c.micro_batch_size);
  v.field("grad_clip", c.grad_clip);
  v.field("eval_interval", c.eval_interval);
  v.field("eval_batches", c.eval_batches);
  v.field("log_interval", c.log_interval);
  v.field("fused_kernels", c.fused_kernels);
}
template <class V>
void visit(V& v, OptimizerConfig& c) {
  v.field("name", c.name);
  v.field("lr", c.lr);
  v.field("betas", c.betas);
  v.field("eps", c.eps);
  v.field("weight_decay", c.weight_decay);
}
template <class V>
void visit(V& v, LrSchedulerConfig& c) {
  v.field("warmup_steps", c.warmup_steps);
  v.field("decay", c.decay);
  v.field("min_lr_ratio", c.min_lr_ratio);
}
template <class V>
void visit(V& v, MixedPrecisionConfig& c) {
  v.field("param_dtype", c.param_dtype);
  v.field("reduce_dtype", c.reduce_dtype);
}
template <class V>
void visit(V& v, FsdpConfig& c) {
  v.field("enabled", c.enabled);
  v.field("activation_checkpointing", c.activation_checkpointing);
  v.field("shard_group_size", c.shard_group_size);
  v.section("mixed_precision", c.mixed_precision);
}
template <class V>
void visit(V& v, ParallelConfig& c) {
  v.field("device", c.device);
  v.field("backend", c.backend);
  v.auto_int("threads_per_rank", c.threads_per_rank);
  v.field("skip_memory_check", c.skip_memory_check);
  v.section("fsdp", c.fsdp);
}
template <class V>
void visit(V& v, CheckpointConfig& c) {
  v.field("enable", c.enable);
  v.field("folder", c.folder);
  v.field("interval", c.interval);
  v.field("async_mode", c.async_mode);
  v.field("keep_latest_k", c.keep_latest_k);
  v.field("model_only", c.model_only);
  v.field("last_save_model_only", c.last_save_model_only);
  v.field("last_save_in_hf", c.last_save_in_hf);
  v.field("export_dtype", c.export_dtype);
  v.field("export_fp32_keys", c.export_fp32_keys);
  v.field("hf_export_interval", c.hf_export_interval);
  v.field("hf_max_keep", c.hf_max_keep);
  v.field("hf_max_shard_size", c.hf_max_shard_size);
  v.field("resume_path", c.resume_path);
  v.field("resume_model_only", c.resume_model_only);
  v.field("load_step", c.load_step);
  v.field("additional_load_paths", c.additional_load_paths);
  v.field("exclude_from_loading", c.exclude_from_loading);
}
template <class V>
void visit(V& v, ConverterConfig& c) {
  v.field("type", c.type, /*required=*/true);
  v.field("rank", c.rank);
  v.field("alpha", c.alpha);
  v.field("dropout", c.dropout);
  v.field("use_rslora", c.use_rslora);
  v.field("target_modules", c.target_modules);
  v.field("export", c.export_mode);
  v.field("save", c.save);
}
template <class V>
void visit(V& v, LoggingConfig& c) {
  v.field("metrics_file", c.metrics_file);
  v.field("peak_tflops", c.peak_tflops);
}
template <class V>
void visit(V& v, Config& c) {
  v.section("job", c.job);
  v.section("model", c.model);
  v.section("data", c.data);
  v.section("training", c.training);
  v.section("optimizer", c.optimizer);
  v.section("lr_scheduler", c.lr_scheduler);
  v.section("parallel", c.parallel);
  v.section("checkpoint", c.checkpoint);
  v.list("converters", c.converters);
  v.section("logging", c.logging);
}

// ---- where values come from ---------------------------------------------------------------

std::string scalar_text(const YAML::Node& node) {
  if (node.IsNull()) return "null";
  if (node.IsScalar()) return node.Scalar();
  YAML::Emitter emitter;
  emitter << YAML::Flow << node;
  return emitter.c_str();
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t substitution = diagonal + (a[i - 1] != b[j - 1]);
      diagonal = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, substitution});
    }
  }
  return row[b.size()];
}

// Tracks the source of every key: a YAML position, or the override that set it.
class Sources {
 public:
  explicit Sources(std::string file) : file_(std::move(file)) {}
  void overridden(const std::string& path, const std::string& text) { overrides_[path] = text; }
  std::string where(const std::string& path, const YAML::Node& node) const {
    // A node with no position was created by an override of a key below it.
    auto below = overrides_.lower_bound(path + ".");
    if (node.IsDefined() && node.Mark().is_null() && below != overrides_.end() &&
        below->first.rfind(path + ".", 0) == 0) {
      return "--set " + below->second;
    }
    for (std::string p = path;;) {  // the longest overridden prefix wins
      auto it = overrides_.find(p);
      if (it != overrides_.end()) return "--set " + it->second;
      const size_t dot = p.rfind('.');
      if (dot == std::string::npos) break;
      p.resize(dot);
    }
    if (node.IsDefined() && node.Mark().line >= 0) {
      return fmt::format("{}:{}:{}", file_, node.Mark().line + 1, node.Mark().column + 1);
    }
    return file_;
  }
  const std::string& file() const { return file_; }

 private:
  std::string file_;
  std::map<std::string, std::string> overrides_;
};

// ---- reading ------------------------------------------------------------------------------

// Reads one section (a YAML mapping) into its struct through `visit`. Positions are those
// of keys: an empty value's own mark points past it, at the next token.
class Reader {
 public:
  // `position`: the section's key (or the list item itself) for messages about the section.
  Reader(const YAML::Node& node, const YAML::Node& position, std::string path,
         const Sources& sources, std::map<std::string, std::string>& where)
      : node_(node), position_(position), path_(std::move(path)), sources_(sources), where_(where) {
    if (node_.IsDefined() && !node_.IsNull() && !node_.IsMap()) {
      fail(fmt::format("{} must be a mapping of keys, got '{}'", path_, scalar_text(node_)),
           sources_.where(path_, position_));
    }
  }

  template <class T>
  void field(const char* key, T& out, bool required = false) {
    const YAML::Node value = lookup(key);
    const std::string path = join(key);
    if (!value.IsDefined()) {
      if (required) {
        fail(fmt::format("missing required key {}", path), sources_.where(path_, position_),
             fmt::format("add `{}:` to the config or pass --set {}=...", path, path));
      }
      return;
    }
    convert(value, path, out);
  }

  // An integer where `auto` (stored as 0) lets the program choose.
  void auto_int(const char* key, int64_t& out) {
    const YAML::Node value = lookup(key);
    if (!value.IsDefined()) return;
    const std::string path = join(key);
    if (value.IsScalar() && value.Scalar() == "auto" && value.Tag() == "?") {
      out = 0;
      return;
    }
    convert(value, path, out);
    if (out <= 0) {
      fail(fmt::format("{} = {} must be `auto` or a positive integer", path, out), where_[path]);
    }
  }

  template <class S>
  void section(const char* key, S& out) {
    const YAML::Node value = lookup(key);
    Reader child(value, last_key_, join(key), sources_, where_);
    visit(child, out);
    child.reject_unknown_keys();
  }

  template <class S>
  void list(const char* key, std::vector<S>& out) {
    const YAML::Node value = lookup(key);
    const std::string path = join(key);
    if (!value.IsDefined() || value.IsNull()) return;
    if (!value.IsSequence()) {
      fail(fmt::format("{} must be a list, got '{}'", path, scalar_text(value)), where_[path]);
    }
    out.clear();
    for (size_t i = 0; i < value.size(); ++i) {
      S item;
      Reader child(value[i], value[i], fmt::format("{}.{}", path, i), sources_, where_);
      visit(child, item);
      child.reject_unknown_keys();
      out.push_back(std::move(item));
    }
  }

  // Called after `visit` has named every key of this section.
  void reject_unknown_keys() const {
    if (!node_.IsDefined() || node_.IsNull()) return;
    std::set<std::string> seen;
    for (const auto& entry : node_) {
      const std::string key = entry.first.Scalar();
      const std::string where = sources_.where(join(key), entry.first);
      // yaml-cpp keeps both copies and `lookup` reads the first, while most YAML readers
      // take the last: either silent choice would surprise someone.
      if (!seen.insert(key).second) {
        fail(fmt::format("duplicate key {}", join(key)), where, "keep only one of them");
      }
      if (std::find(known_.begin(), known_.end(), key) != known_.end()) continue;
      // Keys that moved: the new place, not the closest spelling.
      static const std::map<std::string, std::string> moved = {
          {"parallel.mixed_precision", "parallel.fsdp.mixed_precision"}};
      if (const auto it = moved.find(join(key)); it != moved.end()) {
        fail(fmt::format("unknown key {}", join(key)), where,
             fmt::format("it moved: use {} (same keys)", it->second));
      }
      std::string best, valid;
      size_t best_distance = SIZE_MAX;
      for (const std::string& k : known_) {
        const size_t d = edit_distance(key, k);
        if (d < best_distance) best_distance = d, best = k;
        valid += (valid.empty() ? "" : ", ") + join(k);
      }
      // Close: a typo or two, but not a different word that happens to be as short.
      const bool close = best_distance <= std::max<size_t>(2, key.size() / 3) &&
                         best_distance < std::min(key.size(), best.size());
      const char* kind = path_.empty() ? "section" : "key";
      fail(fmt::format("unknown {} {}", kind, join(key)), where,
           close ? fmt::format("did you mean {}?", join(best))
                 : fmt::format("valid {}s here: {}", kind, valid));
    }
  }

 private:
  std::string join(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }

  // The value of `key` (undefined when absent); records the key as known and where it is.
  // (YAML::Node's `=` writes through to the node it refers to; `reset` rebinds.)
  YAML::Node lookup(const char* key) {
    known_.emplace_back(key);
    last_key_.reset(YAML::Node(YAML::NodeType::Undefined));
    if (!node_.IsDefined() || node_.IsNull()) return last_key_;
    for (const auto& entry : node_) {
      if (entry.first.Scalar() == key) {
        last_key_.reset(entry.first);
        where_[join(key)] = sources_.where(join(key), entry.first);
        return entry.second;
      }
    }
    return last_key_;
  }

  [[noreturn]] void wrong_type(const YAML::Node& value, const std::string& path,
                               const char* expected) const {
    fail(fmt::format("{} must be {}, got '{}'", path, expected, scalar_text(value)),
         where_.at(path));
  }

  // The text of a number or boolean. Quoting makes any scalar a string in YAML, so "128"
  // where an integer is expected is the user's mistake, not ours to guess.
  const std::string& plain_text(const YAML::Node& value, const std::string& path,
                                const char* expected) const {
    if (!value.IsScalar()) wrong_type(value, path, expected);
    if (value.Tag() == "!" || value.Tag() == "tag:yaml.org,2002:str") {
      fail(fmt::format("{} must be {}, got the string '{}'", path, expected, value.Scalar()),
           where_.at(path), "remove the quotes");
    }
    return value.Scalar();
  }

  void convert(const YAML::Node& value, const std::string& path, int64_t& out) const {
    const std::string& text = plain_text(value, path, "an integer");
    char* end = nullptr;
    errno = 0;
    const long long parsed = std::strtoll(text.c_str(), &end, 10);
    if (text.empty() || *end != '\0' || errno == ERANGE) wrong_type(value, path, "an integer");
    out = parsed;
  }
  void convert(const YAML::Node& value, const std::string& path, double& out) const {
    const std::string& text = plain_text(value, path, "a number");
    char* end = nullptr;
    const double parsed = std::strtod(text.c_str(), &end);
    if (text.empty() || *end != '\0' || !std::isfinite(parsed)) {
      wrong_type(value, path, "a number");
    }
    out = parsed;
  }
  void convert(const YAML::Node& value, const std::string& path, bool& out) const {
    // YAML 1.2's booleans only: `yes`/`on` are strings there, and ambiguous to readers.
    static const std::set<std::string> kTrue = {"true", "True", "TRUE"};
    static const std::set<std::string> kFalse = {"false", "False", "FALSE"};
    const std::string& text = plain_text(value, path, "true or false");
    if (!kTrue.count(text) && !kFalse.count(text)) wrong_type(value, path, "true or false");
    out = kTrue.count(text) > 0;
  }
  void convert(const YAML::Node& value, const std::string& path, std::string& out) const {
    if (!value.IsScalar()) wrong_type(value, path, "a string");
    out = value.Scalar();
  }
  void convert(const YAML::Node& value, const std::string& path, LrDecay& out) const {
    std::string text;
    convert(value, path, text);
    for (const auto& [name, decay] : kDecayNames) {
      if (name == text) {
        out = decay;
        return;
      }
    }
    fail(fmt::format("{} = '{}' is not one of: cosine, linear, none", path, text), where_.at(path));
  }
  template <class T>
  void convert(const YAML::Node& value, const std::string& path, std::optional<T>& out) const {
    out.reset();
    if (value.IsNull()) return;
    T inner{};
    convert(value, path, inner);
    out = inner;
  }
  template <class T>
  void convert(const YAML::Node& value, const std::string& path, std::vector<T>& out) const {
    out.clear();
    if (value.IsNull()) return;
    if (!value.IsSequence()) wrong_type(value, path, "a list");
    for (size_t i = 0; i < value.size(); ++i) {
      T item{};
      convert(value[i], path, item);
      out.push_back(item);
    }
  }

  YAML::Node node_;
  YAML::Node position_;
  YAML::Node last_key_;  // the key node `lookup` found last
  std::string path_;
  const Sources& sources_;
  std::map<std::string, std::string>& where_;
  std::vector<std::string> known_;
};

// ---- writing ------------------------------------------------------------------------------

std::string yaml_string(const std::string& s) {
  // Plain only when no YAML reader can take it for anything but this string (null, a
  // boolean in YAML 1.1 or 1.2, in any case).
  std::string lower;
  for (char ch : s) lower += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  static const std::set<std::string> kReserved = {"null", "true", "false", "yes", "no",
                                                  "on",   "off",  "y",     "n"};
  const bool plain = !s.empty() && std::isalpha(static_cast<unsigned char>(s.front())) &&
                     s.find_first_not_of(
                         "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                         "0123456789_./-") == std::string::npos &&
                     !kReserved.count(lower);
  if (plain) return s;
  // Double quotes: the only YAML style with escapes, so control characters survive.
  std::string quoted = "\"";
  for (char ch : s) {
    if (static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f) {
      quoted += fmt::format("\\x{:02x}", static_cast<unsigned char>(ch));
    } else {
      quoted += (ch == '"' || ch == '\\') ? std::string{'\\', ch} : std::string{ch};
    }
  }
  return quoted + "\"";
}

std::string yaml_double(double x) {
  std::string s = fmt::format("{}", x);
  if (s.find_first_of(".en") == std::string::npos) return s + ".0";  // 10000 -> 10000.0
  const size_t e = s.find('e');
  if (e != std::string::npos && s.find('.') == std::string::npos) s.insert(e, ".0");  // 1e-05
  return s;
}

class Writer {
 public:
  explicit Writer(int indent = 0) : indent_(indent) {}
  const std::string& text() const { return out_; }

  template <class T>
  void field(const char* key, const T& value, bool = false) {
    line(key, format(value));
  }
  void auto_int(const char* key, const int64_t& value) {
    line(key, value == 0 ? "auto" : std::to_string(value));
  }
  template <class S>
  void section(const char* key, S& value) {
    out_ += fmt::format("{:{}}{}:\n", "", indent_, key);
    Writer child(indent_ + 2);
    visit(child, value);
    out_ += child.text();
  }
  template <class S>
  void list(const char* key, std::vector<S>& items) {
    if (items.empty()) return line(key, "[]");
    out_ += fmt::format("{:{}}{}:\n", "", indent_, key);
    for (S& item : items) {
      Writer child(indent_ + 4);
      visit(child, item);
      std::string item_text = child.text();
      item_text.replace(indent_, 4, "  - ");  // the first key carries the item marker
      out_ += item_text;
    }
  }

 private:
  void line(const char* key, const std::string& value) {
    out_ += fmt::format("{:{}}{}: {}\n", "", indent_, key, value);
  }
  static std::string format(int64_t v) { return std::to_string(v); }
  static std::string format(double v) { return yaml_double(v); }
  static std::string format(bool v) { return v ? "true" : "false"; }
  static std::string format(const std::string& v) { return yaml_string(v); }
  static std::string format(LrDecay v) {
    for (const auto& [name, decay] : kDecayNames) {
      if (decay == v) return name;
    }
    return "?";
  }
  template <class T>
  static std::string format(const std::optional<T>& v) {
    return v ? format(*v) : "null";
  }
  template <class T>
  static std::string format(const std::vector<T>& v) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + format(v[i]);
    return s + "]";
  }

  int indent_;
  std::string out_;
};

// ---- overrides ----------------------------------------------------------------------------

void apply_override(YAML::Node& root, const std::string& text, Sources& sources) {
  const size_t eq = text.find('=');
  const std::string hint = "write --set section.key=value, e.g. --set training.steps=100";
  if (eq == std::string::npos) {
    fail(fmt::format("override '{}' has no '='", text), "--set " + text, hint);
  }
  const std::string path = text.substr(0, eq);
  std::vector<std::string> segments;
  for (size_t begin = 0;;) {
    const size_t dot = path.find('.', begin);
    segments.push_back(path.substr(begin, dot == std::string::npos ? dot : dot - begin));
    if (segments.back().empty()) {
      fail(fmt::format("override '{}' has an empty key", text), "--set " + text, hint);
    }
    if (dot == std::string::npos) break;
    begin = dot + 1;
  }
  YAML::Node value;
  try {
    value = YAML::Load(text.substr(eq + 1));
  } catch (const YAML::Exception& e) {
    fail(fmt::format("the value of override '{}' is not valid YAML: {}", text, e.msg),
         "--set " + text, "quote strings that contain YAML syntax, e.g. --set 'job.name=\"a: b\"'");
  }
  // Walk the path, creating sections the file left out (reading then reports unknown ones).
  // A list entry is addressed by its index: converters.0.rank=4, or converters.0={...}.
  const std::string where = "--set " + text;
  YAML::Node node;
  node.reset(root);
  std::string walked;  // the dotted path of `node`
  for (size_t i = 0; i < segments.size(); ++i) {
    const std::string& seg = segments[i];
    const bool last = i + 1 == segments.size();
    YAML::Node next;
    if (node.IsSequence()) {
      const bool is_index = std::all_of(seg.begin(), seg.end(), [](char ch) {
        return std::isdigit(static_cast<unsigned char>(ch));
      });
      const size_t index = is_index ? std::strtoul(seg.c_str(), nullptr, 10) : SIZE_MAX;
      if (index >= node.size()) {
        fail(fmt::format("override '{}': {} has {} entr{}, '{}' is not an index of it", text,
                         walked, node.size(), node.size() == 1 ? "y" : "ies", seg),
             where, fmt::format("to replace the whole list: --set {}=[...]", walked));
      }
      if (last) {
        node[index] = value;
      } else {
        next.reset(node[index]);
      }
    } else if (node.IsMap() || node.IsNull()) {
      if (last) {
        node[seg] = value;
      } else {
        // A missing list reads as empty, so converters.0.rank=4 says there is no entry 0.
        const bool index_next = std::isdigit(static_cast<unsigned char>(segments[i + 1][0]));
        if (!node[seg].IsDefined() || node[seg].IsNull()) {
          node[seg] = YAML::Node(index_next ? YAML::NodeType::Sequence : YAML::NodeType::Map);
        }
        next.reset(node[seg]);
      }
    } else {
      fail(fmt::format("override '{}': {} is a value, not a section", text, walked), where);
    }
    node.reset(next);
    walked += (walked.empty() ? "" : ".") + seg;
  }
  sources.overridden(path, text);
}

}  // namespace

// ---- the model config as JSON ---------------------------------------------------------------

namespace {

class JsonWriter {
 public:
  template <class T>
  void field(const char* key, const T& value, bool = false) {
    out[key] = value;
  }
  template <class T>
  void field(const char* key, const std::optional<T>& value, bool = false) {
    out[key] = value ? nlohmann::json(*value) : nlohmann::json();
  }
  nlohmann::json out = nlohmann::json::object();
};

class JsonReader {
 public:
  explicit JsonReader(const nlohmann::json& in) : in_(in) {}
  template <class T>
  void field(const char* key, T& value, bool = false) {
    value = in_.at(key).get<T>();
  }
  template <class T>
  void field(const char* key, std::optional<T>& value, bool = false) {
    const nlohmann::json& j = in_.at(key);
    value = j.is_null() ? std::nullopt : std::optional<T>(j.get<T>());
  }

 private:
  const nlohmann::json& in_;
};

}  // namespace

nlohmann::json model_config_json(const ModelConfig& config) {
  ModelConfig copy = config;  // the visitors take mutable sections; the writer only reads
  JsonWriter writer;
  visit(writer, copy);
  writer.out["ffn_hidden_dim"] = config.ffn_hidden_dim();
  return writer.out;
}

ModelConfig model_config_from_json(const nlohmann::json& model, const std::string& where) {
  ModelConfig config;
  try {
    JsonReader reader(model);
    visit(reader, config);
  } catch (const nlohmann::json::exception& e) {
    throw ConfigError(fmt::format(
        "{}: the \"model\" entry is incomplete ({})\nHINT: the file is damaged or was not written "
        "by Strata; load another checkpoint, or convert the model from its Hugging Face directory",
        where, e.what()));
  }
  return config;
}

bool config_sets_model(const std::string& path, const std::vector<std::string>& overrides) {
  for (const std::string& text : overrides) {
    if (text.rfind("model.", 0) == 0 || text.rfind("model=", 0) == 0) return true;
  }
  try {
    const YAML::Node root = YAML::LoadFile(path);
    return root.IsMap() && root["model"].IsDefined() && !root["model"].IsNull();
  } catch (const YAML::Exception&) {
    return false;  // load_config reports it
  }
}

Config parse_config(const std::string& yaml_text, const std::string& source_name,
                    const std::vector<std::string>& overrides, int world_size,
                    const ModelConfig* model_defaults) {
  if (world_size < 1) {
    fail(fmt::format("world size {} is not a number of ranks", world_size), source_name);
  }
  Sources sources(source_name);
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    fail(fmt::format("invalid YAML: {}", e.msg),
         e.mark.is_null()
             ? source_name
             : fmt::format("{}:{}:{}", source_name, e.mark.line + 1, e.mark.column + 1),
         "check the indentation and brackets around that position");
  }
  if (root.IsNull()) root = YAML::Node(YAML::NodeType::Map);
  if (!root.IsMap()) {
    fail(fmt::format("the config must be a mapping of sections (job:, model:, ...), got '{}'",
                     scalar_text(root)),
         sources.where("", root));
  }
  for (const std::string& text : overrides) apply_override(root, text, sources);

  Config config;
  if (model_defaults) config.model = *model_defaults;
  std::map<std::string, std::string> where;
  Reader reader(root, root, "", sources, where);
  visit(reader, config);
  reader.reject_unknown_keys();
  for (size_t i = 0; i < config.data.sources.size(); ++i) {  // unnamed sources: by position
    if (!where.count(fmt::format("data.sources.{}.name", i))) {
      config.data.sources[i].name = fmt::format("source{}", i);
    }
  }
  config_detail::validate(config, where, sources.file(), world_size);
  return config;
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides,
                   int world_size, const ModelConfig* model_defaults) {
  std::ifstream in(path);
  if (!in) {
    fail(fmt::format("cannot read the config file: {}", std::strerror(errno)), path,
         "check the path given to --config");
  }
  std::ostringstream text;
  text << in.rdbuf();
  return parse_config(text.str(), path, overrides, world_size, model_defaults);
}

std::string to_yaml(const Config& config) {
  Config copy = config;  // the visitors take mutable sections; the writer only reads them
  Writer writer;
  visit(writer, copy);
  return writer.text();
}

}  // namespace strata
