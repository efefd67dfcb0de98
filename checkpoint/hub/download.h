// Resolving a Hub spec to a local directory (docs/formats.md): the revision to a commit, the
// file listing under the subfolder, and a download of each file that the cache lacks (every
// loadable file for a model, the tokenizer files alone for a tokenizer)
// (HEAD resolve, then GET into blobs/<etag>.incomplete under the blob's lock, size and content
// checked, renamed, linked into the snapshot). Offline (HF_HUB_OFFLINE), and when the Hub cannot
// be reached, the cache alone answers. Across ranks, one process per node downloads and every
// rank learns the outcome from one collective.
#pragma once

#include <functional>
#include <string>

#include "checkpoint/hub/cache.h"
#include "checkpoint/hub/spec.h"

namespace strata {

class ProcessGroup;

struct HubResolution {
  std::string dir;  // snapshots/<commit>[/<subfolder>]
  std::string commit;
  int files = 0;       // files of the set under the subfolder
  int downloaded = 0;  // of which fetched now (the rest were cached)
  uint64_t bytes = 0;  // bytes fetched now
  std::string how;     // "downloaded", "cached", or why the cache alone answered
};

using HubLog = std::function<void(const std::string&)>;

// Resolves `spec` in this process alone. Throws CheckpointError with one message that names the
// spec, the repo, subfolder and revision, the HTTP status and X-Error-Code, and a hint (a token
// for 401/403, the cache for offline use). `set`: the files fetched (and required) under the
// subfolder; the cache layout and the offline rules are the same for every set.
HubResolution resolve_hub_spec(const HubSpec& spec, const HubSettings& settings, const HubLog& log,
                               HubFileSet set = HubFileSet::kModel);

// A model path as the user wrote it (resume_path, additional_load_paths, --from): a local path
// is returned unchanged; a Hub spec is resolved to its snapshot directory. With a process group
// of several ranks, local rank 0 of each node resolves while the others wait in one all-gather
// that carries every rank's outcome: all ranks then return their node's directory, or all throw
// the same message when any node failed. `log` gets progress lines (downloading ranks only) and
// one summary line (rank 0).
std::string resolve_model_path(const std::string& path, const ProcessGroup* group,
                               const HubLog& log);

// A tokenizer path as the user wrote it (--tokenizer, data.tokenizer, a chat template's
// tokenizer_config.json): a local path is returned unchanged; a Hub spec is resolved as by
// resolve_model_path, but only its tokenizer files are fetched (hub_tokenizer_files(), never the
// weights), to a snapshot directory holding tokenizer.json or tokenizer.model. A name without
// hf:// whose base name ends in .json, .model or .jinja is always a local path.
std::string resolve_tokenizer_path(const std::string& path, const ProcessGroup* group,
                                   const HubLog& log);

}  // namespace strata
