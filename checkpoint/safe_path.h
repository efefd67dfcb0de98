// Confinement of paths that come from files, servers or the network: a name read from a
// checkpoint's metadata, a `latest` pointer, an index's weight_map or a Hub listing must name
// a file inside its base directory. One function decides, for every such path.
#pragma once

#include <cstddef>
#include <string>

namespace strata {

// The longest relative path and path component accepted (Linux's PATH_MAX and NAME_MAX).
constexpr size_t kMaxPathBytes = 4096;
constexpr size_t kMaxNameBytes = 255;

// `base`/`name`, after checking that `name` stays inside `base`: `name` must be non-empty,
// relative and not too long (kMaxPathBytes, kMaxNameBytes a component), contain no NUL,
// backslash or control character, no "." or ".." component (also
// when percent-encoded: "%2e%2e", "%2f"), and, once symlinks are resolved, the path must still
// lie inside `resolve_root` (default: `base` itself; a Hub cache snapshot passes its repo
// folder, whose snapshots link into blobs/). Throws CheckpointError naming `what` (e.g.
// "metadata.json of /ckpt/step-000010: rank file") and the offending name.
std::string path_inside(const std::string& base, const std::string& name, const std::string& what,
                        const std::string& resolve_root = "");

// The reason `name` is not a safe relative path (the lexical checks above), or "" when it is.
std::string unsafe_name_reason(const std::string& name);

// The folder symlinks under `dir` may resolve into: the repo folder (models--owner--name) when
// `dir` is a snapshot of an HF cache (…/models--o--n/snapshots/<rev>[/sub]), else `dir`.
std::string confinement_root(const std::string& dir);

}  // namespace strata
