// The Hugging Face Hub cache on disk, laid out exactly as huggingface_hub does (docs/formats.md
// "Hub cache"), so that a cache filled by Python or JavaScript clients serves Strata and the
// reverse:
// `<cache>/models--owner--repo/{blobs/<etag>, refs/<revision>, snapshots/<commit>/<path>}`,
// refs holding the 40-hex commit without a newline, snapshot files relative symlinks into
// blobs, `.locks/models--owner--repo/<etag>.lock` taken with flock. Also the Hub settings read
// from the environment and the offline resolution of a spec. No network.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "checkpoint/hub/spec.h"

namespace strata {

// Hub settings from the environment. A variable set to the empty string counts as unset.
struct HubSettings {
  std::string cache_dir;  // HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub,
                          // XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub
  std::string endpoint;   // HF_ENDPOINT (default the public Hub), no trailing '/'
  std::string
      token;  // HF_TOKEN, HUGGING_FACE_HUB_TOKEN, or the token file; "" for none. Never printed.
  std::string token_source;        // where the token came from, for hints ("HF_TOKEN", a file path)
  bool offline = false;            // HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is 1/ON/YES/TRUE
  bool symlinks = true;            // false under HF_HUB_DISABLE_SYMLINKS: snapshot files are copies
  double metadata_timeout_s = 10;  // HF_HUB_ETAG_TIMEOUT: API and HEAD requests
  double download_timeout_s =
      10;            // HF_HUB_DOWNLOAD_TIMEOUT: a stalled transfer is retried after this
  int attempts = 5;  // STRATA_HUB_ATTEMPTS: tries of a request failing transiently
  // Bounds of one file's download, whatever progress its retries make (a server that sends a
  // few bytes and stalls, again and again):
  double min_rate = 1024;        // STRATA_HUB_MIN_RATE: bytes/s on average at least (0: off),
  double min_rate_after_s = 60;  // STRATA_HUB_MIN_RATE_AFTER: once it has run this long
  double file_deadline_s = 0;    // STRATA_HUB_FILE_DEADLINE: seconds at most (0: none)
  int max_retries = 100;         // STRATA_HUB_MAX_RETRIES: retries in all

  static HubSettings from_environment();
};

bool is_commit_hash(const std::string& text);  // 40 lower-case hex digits

// The revision a spec asks for ("main" when it names none).
std::string spec_revision(const HubSpec& spec);

// One repository's part of the cache.
class HubRepoCache {
 public:
  HubRepoCache(const std::string& cache_dir, const std::string& repo_id);

  const std::string& repo_dir() const { return repo_dir_; }  // <cache>/models--owner--repo
  std::string snapshot_dir(const std::string& commit) const;
  std::string pointer_path(const std::string& commit, const std::string& path_in_repo) const;
  std::string blob_path(const std::string& etag) const;
  std::string lock_path(const std::string& etag) const;

  // The commit refs/<revision> names (refs/pr/1 is the nested file refs/refs/pr/1), or nullopt.
  std::optional<std::string> read_ref(const std::string& revision) const;
  // Writes refs/<revision> = commit (40 characters, no newline) atomically, when it differs.
  void write_ref(const std::string& revision, const std::string& commit) const;

  // Creates blobs/, snapshots/ and CACHEDIR.TAG (best effort) before the first download.
  void prepare() const;
  // Points snapshots/<commit>/<path> at blobs/<etag>: a relative symlink, or a copy of the blob
  // when `symlinks` is false. Replaces an existing pointer.
  void link(const std::string& commit, const std::string& path_in_repo, const std::string& etag,
            bool symlinks) const;

 private:
  std::string cache_dir_, repo_dir_, lock_dir_;
};

// An exclusive flock() on `path` (created with mode 0664 if missing, never deleted), as Python's
// filelock takes it: processes sharing a cache serialise on the same files.
class FileLock {
 public:
  explicit FileLock(const std::string& path);
  ~FileLock();
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;

 private:
  int fd_ = -1;
};

// Which files of a Hub repo a resolution fetches: everything a model source loads, or the
// tokenizer alone (never the weights).
enum class HubFileSet { kModel, kTokenizer };

// Whether a file of a Hub repo is one Strata loads (weights, configs, tokenizer files, a
// checkpoint's `latest` pointer): `*.safetensors`, `*.json`, `*.yaml`, `*.model`, `*.txt`,
// `latest`. `name` is the base name.
bool is_loadable_hub_file(const std::string& name);

// The tokenizer files fetched for a tokenizer: tokenizer.json, tokenizer_config.json,
// tokenizer.model, special_tokens_map.json (those the repo has).
const std::vector<std::string>& hub_tokenizer_files();

// Whether the file `name` (a base name) belongs to `set`: is_loadable_hub_file for kModel, one
// of hub_tokenizer_files() for kTokenizer.
bool is_hub_file_in(HubFileSet set, const std::string& name);

// The files of `set` for messages: "loadable file (*.safetensors, ...)", "tokenizer file
// (tokenizer.json, ...)".
std::string describe_hub_file_set(HubFileSet set);

// What a tokenizer needs, for messages: tokenizer.json or tokenizer.model, and the files read
// beside it.
std::string tokenizer_needs();

// What `dir` lacks to be loaded as a model source: an HF model (config.json and its weights:
// model.safetensors, or the index and every shard it names), a PEFT adapter
// (adapter_config.json + adapter_model.safetensors) or a Strata checkpoint (a step directory's
// metadata.json and the files it lists, or a folder's `latest` and that step). Empty: complete.
std::vector<std::string> missing_source_files(const std::string& dir);

// What `dir` lacks to serve as `set`: missing_source_files for kModel; for kTokenizer, one
// entry "<dir>/tokenizer.json or tokenizer.model (a tokenizer)" when it holds neither.
std::vector<std::string> missing_hub_files(HubFileSet set, const std::string& dir);

// Resolves `spec` from the cache alone: a commit names its snapshot; a branch or tag is
// read from refs/. Returns snapshots/<commit>[/<subfolder>], or throws CheckpointError naming
// what is missing and how to fetch it. `why`: the reason the network is not used ("HF_HUB_OFFLINE
// is set", or the error that made the Hub unreachable). `set`: the files the snapshot must hold.
struct CachedSnapshot {
  std::string commit;
  std::string dir;
};
CachedSnapshot resolve_from_cache(const HubSpec& spec, const HubSettings& settings,
                                  const std::string& why, HubFileSet set = HubFileSet::kModel);

// "repo owner/repo, subfolder s, revision r" for messages.
std::string describe_spec(const HubSpec& spec);

}  // namespace strata
