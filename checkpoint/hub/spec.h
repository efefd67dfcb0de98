// Hub specs for `resume_path` and `--from` (docs/formats.md): `hf://owner/repo[/subdir][@rev]`,
// the official placement `hf://owner/repo@rev[/subdir]`, an optional `models/` type prefix,
// and the bare `owner/repo[/subdir][@rev]`, which means the Hub only when no local path of
// that name exists. Revisions: a branch, a tag, a 40-hex commit, `refs/pr/N` or
// `refs/convert/NAME` (right after the repo id, or percent-encoded). hub_download resolves a
// spec to a directory of the HF cache.
#pragma once

#include <optional>
#include <string>

namespace strata {

struct HubSpec {
  std::string text;       // as the user wrote it
  std::string repo_id;    // owner/repo
  std::string subfolder;  // "" or "a/b"
  std::string revision;   // "" means the default branch (main)
};

// The Hub spec `text` names, or nullopt when it names a local path (`local_path_exists`, or a
// bare name that does not look like owner/repo). Throws CheckpointError, quoting `text`, for
// an `hf://` spec that is invalid, and for a bare owner/repo-like text that is neither an
// existing path nor a valid spec.
std::optional<HubSpec> parse_hub_spec(const std::string& text, bool local_path_exists);

}  // namespace strata
