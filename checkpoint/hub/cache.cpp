// The Hub cache layout, Hub settings and offline resolution.
#include "checkpoint/hub/cache.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "checkpoint/checkpoint_metadata.h"
#include "checkpoint/file_io.h"
#include "checkpoint/safe_path.h"
#include "checkpoint/safetensors_header.h"

namespace strata {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// The value of `name`, or "" when it is unset or empty.
std::string env(const char* name) {
  const char* value = std::getenv(name);
  return value ? value : "";
}

bool truthy(const std::string& value) {
  std::string upper = value;
  std::transform(upper.begin(), upper.end(), upper.begin(),
                 [](unsigned char c) { return std::toupper(c); });
  return upper == "1" || upper == "ON" || upper == "YES" || upper == "TRUE";
}

// Python's os.path.expanduser + os.path.expandvars: a leading `~` is $HOME, `$VAR` and
// `${VAR}` are replaced by their values (unset ones are left as written).
std::string expand(const std::string& path) {
  std::string text = path;
  if (!text.empty() && text[0] == '~' && (text.size() == 1 || text[1] == '/'))
    text = env("HOME") + text.substr(1);
  std::string out;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] != '$') {
      out += text[i];
      continue;
    }
    const bool braced = i + 1 < text.size() && text[i + 1] == '{';
    size_t start = i + (braced ? 2 : 1), end = start;
    while (end < text.size() &&
           (std::isalnum(static_cast<unsigned char>(text[end])) || text[end] == '_'))
      ++end;
    if (end == start || (braced && (end >= text.size() || text[end] != '}'))) {
      out += text[i];
      continue;
    }
    const std::string name = text.substr(start, end - start);
    const char* value = std::getenv(name.c_str());
    out += value ? std::string(value) : text.substr(i, end + (braced ? 1 : 0) - i);
    i = end + (braced ? 1 : 0) - 1;
  }
  return out;
}

double seconds_from(const char* name, double fallback) {
  const std::string text = env(name);
  if (text.empty()) return fallback;
  char* end = nullptr;
  const double value = std::strtod(text.c_str(), &end);
  if (end == text.c_str() || *end != '\0' || !(value > 0)) {
    throw CheckpointError(fmt::format(
        "environment variable {}='{}' is not a positive number of seconds", name, text));
  }
  return value;
}

// A number >= 0 from the environment (`unit` names it in the message), or `fallback`.
double non_negative_from(const char* name, double fallback, const char* unit) {
  const std::string text = env(name);
  if (text.empty()) return fallback;
  char* end = nullptr;
  const double value = std::strtod(text.c_str(), &end);
  if (end == text.c_str() || *end != '\0' || !(value >= 0) || !std::isfinite(value)) {
    throw CheckpointError(fmt::format(
        "environment variable {}='{}' is not a number >= 0 of {}\nHINT: unset it for the "
        "default, or give e.g. {}=0 to turn the bound off",
        name, text, unit, name));
  }
  return value;
}

// A whole number from the environment, at least `min`, or `fallback`.
int integer_from(const char* name, int fallback, int min) {
  const std::string text = env(name);
  if (text.empty()) return fallback;
  int value = min - 1;
  try {
    value = std::stoi(text);
  } catch (const std::exception&) {
  }
  if (value < min || std::to_string(value) != text) {
    throw CheckpointError(
        fmt::format("environment variable {}='{}' is not an integer >= {}", name, text, min));
  }
  return value;
}

std::string trim(const std::string& text) {
  const size_t begin = text.find_first_not_of(" \t\r\n");
  if (begin == std::string::npos) return "";
  return text.substr(begin, text.find_last_not_of(" \t\r\n") - begin + 1);
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

// Writes `content` to `path` through a uniquely named temporary file and a rename, so that
// concurrent writers (other processes sharing the cache) never see a partial file.
void write_replacing(const fs::path& path, const std::string& content) {
  fs::create_directories(path.parent_path());
  const fs::path tmp = path.string() + fmt::format(".{:08x}.tmp", std::random_device()());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << content;
    if (!out.flush())
      throw IoError(fmt::format("cannot write {}: {}", tmp.string(), std::strerror(errno)));
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    fs::remove(tmp);
    throw IoError(
        fmt::format("cannot rename {} to {}: {}", tmp.string(), path.string(), ec.message()));
  }
}

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::vector<std::string> missing_in(const fs::path& dir, int depth);

// Files of a Strata step directory: metadata.json and what it lists.
std::vector<std::string> missing_in_step(const fs::path& dir) {
  const fs::path meta = dir / "metadata.json";
  std::vector<std::string> missing;
  try {
    const json parsed = json::parse(read_text(meta));
    for (const auto& [file, info] : parsed.at("files").items()) {
      const std::string unsafe = unsafe_name_reason(file);
      if (!unsafe.empty()) {
        missing.push_back(fmt::format("{} (names the file '{}': {})", meta.string(), file, unsafe));
      } else if (!fs::exists(dir / file)) {
        missing.push_back((dir / file).string());
      }
    }
    for (const char* name : {"train_state.json", "config.yaml"}) {
      if (!fs::exists(dir / name)) missing.push_back((dir / name).string());
    }
  } catch (const json::exception& e) {
    missing.push_back(fmt::format("{} (unreadable: {})", meta.string(), e.what()));
  }
  return missing;
}

std::vector<std::string> missing_in(const fs::path& dir, int depth) {
  std::vector<std::string> missing;
  if (fs::exists(dir / "config.json")) {  // an HF model
    const fs::path index = dir / "model.safetensors.index.json";
    if (fs::exists(dir / "model.safetensors")) return missing;
    if (!fs::exists(index)) {
      missing.push_back((dir / "model.safetensors").string() +
                        " (or model.safetensors.index.json and its shards)");
      return missing;
    }
    try {
      std::vector<std::string> shards;
      const json parsed = json::parse(read_text(index));  // outlives the loop over its items
      for (const auto& [key, file] : parsed.at("weight_map").items()) {
        shards.push_back(file.get<std::string>());
      }
      std::sort(shards.begin(), shards.end());
      shards.erase(std::unique(shards.begin(), shards.end()), shards.end());
      for (const std::string& shard : shards) {
        const std::string unsafe = unsafe_name_reason(shard);
        if (!unsafe.empty()) {
          missing.push_back(
              fmt::format("{} (weight_map names '{}': {})", index.string(), shard, unsafe));
        } else if (!fs::exists(dir / shard)) {
          missing.push_back((dir / shard).string());
        }
      }
    } catch (const json::exception& e) {
      missing.push_back(fmt::format("{} (unreadable: {})", index.string(), e.what()));
    }
    return missing;
  }
  if (fs::exists(dir / "adapter_config.json")) {  // a PEFT adapter
    if (!fs::exists(dir / "adapter_model.safetensors"))
      missing.push_back((dir / "adapter_model.safetensors").string());
    return missing;
  }
  if (fs::exists(dir / "metadata.json")) return missing_in_step(dir);  // a Strata step directory
  if (fs::exists(dir / "latest") && depth == 0) {                      // a Strata checkpoint folder
    const std::string step = trim(read_text(dir / "latest"));
    if (step_of_dir_name(step) < 0) {
      missing.push_back(
          fmt::format("{} (names no step directory: '{}')", (dir / "latest").string(), step));
      return missing;
    }
    if (!fs::exists(dir / step / "metadata.json")) {
      missing.push_back((dir / step / "metadata.json").string());
      return missing;
    }
    return missing_in(dir / step, depth + 1);
  }
  missing.push_back(
      fmt::format("{}/config.json (an HF model), adapter_config.json (a PEFT adapter), or "
                  "metadata.json or latest (a Strata checkpoint)",
                  dir.string()));
  return missing;
}

}  // namespace

HubSettings HubSettings::from_environment() {
  HubSettings s;
  const std::string xdg = env("XDG_CACHE_HOME");
  const std::string home = expand(
      !env("HF_HOME").empty() ? env("HF_HOME") : (xdg.empty() ? "~/.cache" : xdg) + "/huggingface");
  std::string cache = env("HF_HUB_CACHE");
  if (cache.empty()) cache = env("HUGGINGFACE_HUB_CACHE");
  cache = cache.empty() ? home + "/hub" : expand(cache);
  std::error_code ec;
  const fs::path canonical = fs::weakly_canonical(fs::absolute(cache), ec);
  s.cache_dir = ec ? fs::absolute(cache).lexically_normal().string() : canonical.string();

  s.endpoint = env("HF_ENDPOINT");
  if (s.endpoint.empty()) s.endpoint = "https://huggingface.co";
  while (!s.endpoint.empty() && s.endpoint.back() == '/') s.endpoint.pop_back();

  if (!truthy(env("HF_HUB_DISABLE_IMPLICIT_TOKEN"))) {
    if (!env("HF_TOKEN").empty()) {
      s.token = trim(env("HF_TOKEN"));
      s.token_source = "HF_TOKEN";
    } else if (!env("HUGGING_FACE_HUB_TOKEN").empty()) {
      s.token = trim(env("HUGGING_FACE_HUB_TOKEN"));
      s.token_source = "HUGGING_FACE_HUB_TOKEN";
    } else {
      const std::string file =
          !env("HF_TOKEN_PATH").empty() ? expand(env("HF_TOKEN_PATH")) : home + "/token";
      if (fs::exists(file)) {
        std::string text = read_text(file);
        text.erase(
            std::remove_if(text.begin(), text.end(), [](char c) { return c == '\r' || c == '\n'; }),
            text.end());
        s.token = trim(text);
        s.token_source = file;
      }
    }
  }
  s.offline = truthy(env("HF_HUB_OFFLINE")) || truthy(env("TRANSFORMERS_OFFLINE"));
  s.symlinks = !truthy(env("HF_HUB_DISABLE_SYMLINKS"));
  s.metadata_timeout_s = seconds_from("HF_HUB_ETAG_TIMEOUT", 10);
  s.download_timeout_s = seconds_from("HF_HUB_DOWNLOAD_TIMEOUT", 10);
  if (const std::string attempts = env("STRATA_HUB_ATTEMPTS"); !attempts.empty()) {
    try {
      s.attempts = std::stoi(attempts);
    } catch (const std::exception&) {
      s.attempts = 0;
    }
    if (s.attempts < 1 || std::to_string(s.attempts) != attempts) {
      throw CheckpointError(fmt::format(
          "environment variable STRATA_HUB_ATTEMPTS='{}' is not a positive integer", attempts));
    }
  }
  s.min_rate = non_negative_from("STRATA_HUB_MIN_RATE", s.min_rate, "bytes per second");
  s.min_rate_after_s =
      non_negative_from("STRATA_HUB_MIN_RATE_AFTER", s.min_rate_after_s, "seconds");
  s.file_deadline_s = non_negative_from("STRATA_HUB_FILE_DEADLINE", s.file_deadline_s, "seconds");
  s.max_retries = integer_from("STRATA_HUB_MAX_RETRIES", s.max_retries, 0);
  return s;
}

bool is_commit_hash(const std::string& text) {
  return text.size() == 40 && std::all_of(text.begin(), text.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

std::string spec_revision(const HubSpec& spec) {
  return spec.revision.empty() ? "main" : spec.revision;
}

std::string describe_spec(const HubSpec& spec) {
  return fmt::format("repo {}{}, revision {}", spec.repo_id,
                     spec.subfolder.empty() ? "" : ", subfolder " + spec.subfolder,
                     spec_revision(spec));
}

HubRepoCache::HubRepoCache(const std::string& cache_dir, const std::string& repo_id)
    : cache_dir_(cache_dir) {
  std::string folder = "models--" + repo_id;
  for (size_t at = folder.find('/'); at != std::string::npos; at = folder.find('/', at))
    folder.replace(at, 1, "--");
  repo_dir_ = (fs::path(cache_dir) / folder).string();
  lock_dir_ = (fs::path(cache_dir) / ".locks" / folder).string();
}

std::string HubRepoCache::snapshot_dir(const std::string& commit) const {
  return (fs::path(repo_dir_) / "snapshots" / commit).string();
}

std::string HubRepoCache::pointer_path(const std::string& commit,
                                       const std::string& path_in_repo) const {
  return (fs::path(snapshot_dir(commit)) / path_in_repo).string();
}

std::string HubRepoCache::blob_path(const std::string& etag) const {
  return (fs::path(repo_dir_) / "blobs" / etag).string();
}

std::string HubRepoCache::lock_path(const std::string& etag) const {
  return (fs::path(lock_dir_) / (etag + ".lock")).string();
}

std::optional<std::string> HubRepoCache::read_ref(const std::string& revision) const {
  const fs::path path = fs::path(repo_dir_) / "refs" / revision;
  if (!fs::is_regular_file(path)) return std::nullopt;
  const std::string commit = trim(read_text(path));
  if (!is_commit_hash(commit)) return std::nullopt;
  return commit;
}

void HubRepoCache::write_ref(const std::string& revision, const std::string& commit) const {
  if (revision == commit || read_ref(revision) == commit) return;
  write_replacing(fs::path(repo_dir_) / "refs" / revision, commit);
}

void HubRepoCache::prepare() const {
  fs::create_directories(fs::path(repo_dir_) / "blobs");
  fs::create_directories(fs::path(repo_dir_) / "snapshots");
  const fs::path tag = fs::path(cache_dir_) / "CACHEDIR.TAG";
  if (!fs::exists(tag)) {
    try {
      write_replacing(tag,
                      "Signature: 8a477f597d28d172789f06886806bc55\n"
                      "# This file is a cache directory tag created by huggingface_hub.\n"
                      "# For information about cache directory tags, see:\n"
                      "#\thttps://bford.info/cachedir/\n");
    } catch (const std::exception&) {
      // Optional, as in huggingface_hub.
    }
  }
}

void HubRepoCache::link(const std::string& commit, const std::string& path_in_repo,
                        const std::string& etag, bool symlinks) const {
  // The path comes from the Hub's listing: it must stay inside the snapshot, also through
  // symlinks already there (which may point into blobs/ only).
  const fs::path pointer =
      path_inside(snapshot_dir(commit), path_in_repo,
                  fmt::format("the file list of Hub repo folder {}", repo_dir_), repo_dir_);
  const fs::path blob = path_inside((fs::path(repo_dir_) / "blobs").string(), etag,
                                    fmt::format("the ETag of {} in {}", path_in_repo, repo_dir_));
  fs::create_directories(pointer.parent_path());
  const fs::path tmp = pointer.string() + fmt::format(".{:08x}.tmp", std::random_device()());
  std::error_code ec;
  if (symlinks) {
    fs::create_symlink(blob.lexically_relative(pointer.parent_path()), tmp, ec);
  } else {
    fs::copy_file(blob, tmp, fs::copy_options::overwrite_existing, ec);
  }
  if (!ec) fs::rename(tmp, pointer, ec);
  if (ec) {
    fs::remove(tmp);
    throw IoError(
        fmt::format("cannot create {} -> {}: {}", pointer.string(), blob.string(), ec.message()));
  }
}

FileLock::FileLock(const std::string& path) {
  fs::create_directories(fs::path(path).parent_path());
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0664);
  if (fd_ < 0)
    throw IoError(fmt::format("cannot open lock file {}: {}", path, std::strerror(errno)));
  (void)::fchmod(fd_, 0664);  // as filelock does; not fatal on a shared cache owned by another user
  while (::flock(fd_, LOCK_EX) != 0) {
    if (errno == EINTR) continue;
    if (errno == ENOLCK || errno == EOPNOTSUPP || errno == ENOSYS)
      break;  // no flock here: like filelock's soft lock, go on
    const int saved = errno;
    ::close(fd_);
    throw IoError(fmt::format("cannot lock {}: {}", path, std::strerror(saved)));
  }
}

FileLock::~FileLock() {
  if (fd_ >= 0) ::close(fd_);  // closing releases the lock
}

bool is_loadable_hub_file(const std::string& name) {
  for (const char* suffix : {".safetensors", ".json", ".yaml", ".model", ".txt"}) {
    if (ends_with(name, suffix)) return true;
  }
  return name == "latest";
}

const std::vector<std::string>& hub_tokenizer_files() {
  static const std::vector<std::string> names = {"tokenizer.json", "tokenizer_config.json",
                                                 "tokenizer.model", "special_tokens_map.json"};
  return names;
}

bool is_hub_file_in(HubFileSet set, const std::string& name) {
  if (set == HubFileSet::kModel) return is_loadable_hub_file(name);
  const std::vector<std::string>& names = hub_tokenizer_files();
  return std::find(names.begin(), names.end(), name) != names.end();
}

std::string describe_hub_file_set(HubFileSet set) {
  if (set == HubFileSet::kModel) return "loadable file (*.safetensors, *.json, tokenizer files)";
  return fmt::format("tokenizer file ({})", fmt::join(hub_tokenizer_files(), ", "));
}

std::string tokenizer_needs() {
  return "a tokenizer needs tokenizer.json (a Hugging Face tokenizer) or tokenizer.model "
         "(SentencePiece), with tokenizer_config.json and special_tokens_map.json beside it "
         "where the model has them";
}

std::vector<std::string> missing_source_files(const std::string& dir) {
  return missing_in(dir, 0);
}

std::vector<std::string> missing_hub_files(HubFileSet set, const std::string& dir) {
  if (set == HubFileSet::kModel) return missing_source_files(dir);
  std::error_code ec;
  for (const char* name : {"tokenizer.json", "tokenizer.model"}) {
    if (fs::is_regular_file(fs::path(dir) / name, ec)) return {};
  }
  return {(fs::path(dir) / "tokenizer.json").string() + " or tokenizer.model (a tokenizer)"};
}

CachedSnapshot resolve_from_cache(const HubSpec& spec, const HubSettings& settings,
                                  const std::string& why, HubFileSet set) {
  const HubRepoCache cache(settings.cache_dir, spec.repo_id);
  const std::string revision = spec_revision(spec);
  const std::string prefix_pattern = spec.subfolder.empty() ? "" : spec.subfolder + "/";
  const std::string include =
      set == HubFileSet::kTokenizer
          ? fmt::format(" --include '{}tokenizer*' '{}special_tokens_map.json'", prefix_pattern,
                        prefix_pattern)
      : spec.subfolder.empty() ? ""
                               : fmt::format(" --include '{}/*'", spec.subfolder);
  const std::string hint = fmt::format(
      "HINT: run once with network access (HF_HUB_OFFLINE unset) to fill the cache, or download "
      "ahead with `hf download {} --revision {}{}` into the same cache (HF_HUB_CACHE or HF_HOME)",
      spec.repo_id, revision, include);
  auto fail = [&](const std::string& what) -> CachedSnapshot {
    throw CheckpointError(
        fmt::format("Hub spec '{}' ({}) is not available: {}, and it is not in the cache "
                    "{}: {}\n{}",
                    spec.text, describe_spec(spec), why, settings.cache_dir, what, hint));
  };
  std::optional<std::string> commit =
      is_commit_hash(revision) ? std::optional<std::string>(revision) : cache.read_ref(revision);
  if (!commit) {
    return fail(fmt::format("no {} (the revision has never been downloaded)",
                            (fs::path(cache.repo_dir()) / "refs" / revision).string()));
  }
  const fs::path snapshot = cache.snapshot_dir(*commit);
  const fs::path dir = spec.subfolder.empty() ? snapshot : snapshot / spec.subfolder;
  if (!fs::is_directory(dir)) return fail(fmt::format("no directory {}", dir.string()));
  std::vector<std::string> missing = missing_hub_files(set, dir.string());
  // A complete listing written by huggingface_hub (trees/<commit>.json) names what else is due.
  const fs::path tree = fs::path(cache.repo_dir()) / "trees" / (*commit + ".json");
  if (fs::exists(tree)) {
    try {
      const std::string prefix = spec.subfolder.empty() ? "" : spec.subfolder + "/";
      const json listing = json::parse(read_text(tree));  // outlives the loop over its items
      for (const auto& [path, info] : listing.at("files").items()) {
        if (path.rfind(prefix, 0) != 0 || path.find('/', prefix.size()) != std::string::npos)
          continue;
        if (is_hub_file_in(set, fs::path(path).filename().string()) &&
            !fs::exists(snapshot / path) &&
            std::find(missing.begin(), missing.end(), (snapshot / path).string()) ==
                missing.end()) {
          missing.push_back((snapshot / path).string());
        }
      }
    } catch (const json::exception&) {
      // Not ours to validate: the files themselves were checked above.
    }
  }
  if (!missing.empty()) {
    std::string list;
    for (const std::string& m : missing) list += "\n  missing: " + m;
    return fail(fmt::format("snapshot {} is incomplete:{}", snapshot.string(), list));
  }
  return {*commit, dir.string()};
}

}  // namespace strata
