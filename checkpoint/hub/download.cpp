// Hub spec resolution: snapshot download into the cache, and the all-rank agreement.
#include "checkpoint/hub/download.h"

#include <sys/stat.h>

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <set>
#include <sstream>

#include "checkpoint/checkpoint_metadata.h"
#include "checkpoint/file_io.h"
#include "checkpoint/hub/http.h"
#include "checkpoint/safe_path.h"
#include "parallel/process_group.h"

namespace strata {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

struct RepoFile {
  std::string path;  // in the repo
  uint64_t size = 0;
};

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

// Pages of a file listing at most: a listing that goes on longer is taken to be endless.
constexpr int kMaxListingPages = 10000;

// An API answer's JSON. Anything else (an HTML page from a proxy, a wrong HF_ENDPOINT) counts
// as the Hub being unreachable: the cache may answer.
json parse_answer(const HttpResponse& response, const std::string& token) {
  try {
    return json::parse(response.body);
  } catch (const json::exception&) {
    throw HubError(redact_secrets(fmt::format("GET {} answered {} with no JSON: '{}'", response.url,
                                              response.status,
                                              redact_secrets(response.body, token).substr(0, 120)),
                                  token),
                   response.status, "", true);
  }
}

// The etag as huggingface_hub normalises it: no W/ prefix, no quotes.
std::string normalise_etag(std::string etag) {
  if (etag.rfind("W/", 0) == 0) etag = etag.substr(2);
  if (etag.size() >= 2 && etag.front() == '"' && etag.back() == '"')
    etag = etag.substr(1, etag.size() - 2);
  return etag;
}

// The URL of `rel="next"` in a Link header, or "".
std::string next_link(const std::string& link) {
  static const std::regex next(R"re(<([^>]*)>\s*;\s*rel="?next"?)re");
  std::smatch match;
  return std::regex_search(link, match, next) ? match[1].str() : "";
}

// Checks a downloaded blob against its etag: SHA-256 for LFS files (64 hex), the git blob SHA-1
// for regular ones (40 hex). Other etags (a CDN's own) are left to the size check.
void verify_blob(const std::string& path, const std::string& etag, uint64_t size,
                 const std::string& label) {
  const bool sha256 = etag.size() == 64, sha1 = etag.size() == 40;
  if (!sha256 && !sha1) return;
  MessageDigest digest(sha256 ? MessageDigest::Algorithm::kSha256
                              : MessageDigest::Algorithm::kSha1);
  if (sha1) {
    const std::string prefix = fmt::format("blob {}", size);
    digest.update(prefix.data(), prefix.size() + 1);  // with the terminating NUL
  }
  std::ifstream in(path, std::ios::binary);
  std::vector<char> buffer(1 << 20);
  while (in) {
    in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    digest.update(buffer.data(), static_cast<size_t>(in.gcount()));
  }
  const std::string actual = digest.hex_digest();
  if (actual != etag) {
    fs::remove(path);
    throw HubError(
        fmt::format(
            "the content of {} does not match its etag {} (got {} {}); the partial file was "
            "removed, run again to download it anew",
            label, etag, sha256 ? "sha256" : "git sha1", actual),
        0, "", false);
  }
}

// The hint of a repo that holds no tokenizer where one was asked for.
constexpr const char* kTokenizerHint =
    "HINT: give the repo (or its subfolder) that holds the model's tokenizer, or a local "
    "tokenizer.json, tokenizer.model or model directory";

class SnapshotDownload {
 public:
  SnapshotDownload(const HubSpec& spec, const HubSettings& settings, const HubLog& log,
                   HubFileSet set)
      : spec_(spec),
        settings_(settings),
        set_(set),
        log_(log),
        http_(settings, log),
        cache_(settings.cache_dir, spec.repo_id) {}

  HubResolution run() {
    HubResolution result;
    const std::string revision = spec_revision(spec_);
    const std::string api = fmt::format("{}/api/models/{}", settings_.endpoint, spec_.repo_id);
    result.commit =
        is_commit_hash(revision)
            ? revision
            : parse_answer(
                  http_.call("GET", fmt::format("{}/revision/{}", api, url_quote(revision))),
                  settings_.token)
                  .value("sha", std::string());
    if (!is_commit_hash(result.commit)) {
      throw HubError(
          fmt::format("the Hub answered commit '{}' for revision {}", result.commit, revision), 0,
          "", false);
    }
    const std::vector<RepoFile> files = list_files(api, result.commit);
    cache_.prepare();
    cache_.write_ref(revision, result.commit);
    const std::string prefix = spec_.subfolder.empty() ? "" : spec_.subfolder + "/";
    auto top_level = [&](const std::string& under) {
      std::vector<RepoFile> out;
      for (const RepoFile& f : files) {
        if (f.path.rfind(under, 0) != 0) continue;
        const std::string rest = f.path.substr(under.size());
        if (rest.find('/') == std::string::npos && is_hub_file_in(set_, rest)) out.push_back(f);
      }
      return out;
    };
    std::vector<RepoFile> wanted = top_level(prefix);
    if (wanted.empty()) {
      const std::string what = fmt::format(
          "the repo has no {} {} at commit {}", describe_hub_file_set(set_),
          spec_.subfolder.empty() ? "at its top level" : "in subfolder " + spec_.subfolder,
          result.commit);
      if (set_ == HubFileSet::kTokenizer) {
        throw HubRuleError(fmt::format("{}: {}", what, tokenizer_needs()), kTokenizerHint, false);
      }
      throw HubError(what, 0, "", false);
    }
    for (const RepoFile& f : wanted) fetch(result, f);
    // A Strata checkpoint folder: its `latest` names the step directory to fetch as well.
    auto has = [&](const char* name) {
      return std::any_of(wanted.begin(), wanted.end(),
                         [&](const RepoFile& f) { return f.path == prefix + name; });
    };
    if (set_ == HubFileSet::kModel && has("latest") && !has("config.json") &&
        !has("adapter_config.json") && !has("metadata.json")) {
      std::string step = read_text(cache_.pointer_path(result.commit, prefix + "latest"));
      step.erase(step.find_last_not_of(" \t\r\n") + 1);
      if (step_of_dir_name(step) >= 0) {
        for (const RepoFile& f : top_level(prefix + step + "/")) fetch(result, f);
      }
    }
    result.dir = spec_.subfolder.empty()
                     ? cache_.snapshot_dir(result.commit)
                     : (fs::path(cache_.snapshot_dir(result.commit)) / spec_.subfolder).string();
    const std::vector<std::string> missing = missing_hub_files(set_, result.dir);
    if (!missing.empty()) {
      std::string list;
      for (const std::string& m : missing) list += "\n  missing: " + m;
      if (set_ == HubFileSet::kTokenizer) {
        throw HubRuleError(
            fmt::format("the downloaded files do not form a tokenizer Strata can load ({}):{}",
                        tokenizer_needs(), list),
            kTokenizerHint, false);
      }
      throw HubError(
          fmt::format("the downloaded files do not form a model Strata can load:{}", list), 0, "",
          false);
    }
    result.how = result.downloaded > 0 ? "downloaded" : "cached";
    return result;
  }

 private:
  // Every file under the subfolder at `commit` (the /tree listing, followed across pages).
  std::vector<RepoFile> list_files(const std::string& api, const std::string& commit) {
    std::string url =
        fmt::format("{}/tree/{}{}?recursive=true&expand=false", api, url_quote(commit),
                    spec_.subfolder.empty() ? "" : "/" + url_quote(spec_.subfolder));
    std::vector<RepoFile> files;
    std::set<std::string> seen;  // pages fetched: a next link back to one is a cycle
    const std::string hint = fmt::format(
        "HINT: the server at {} does not answer as the Hub does (a broken proxy or mirror, or a "
        "wrong HF_ENDPOINT); fix or unset HF_ENDPOINT, or download the repo another way and "
        "give its local directory",
        settings_.endpoint);
    for (int page = 0; !url.empty(); ++page) {
      if (!seen.insert(url).second) {
        throw HubRuleError(
            http_.redact(fmt::format(
                "the file listing of {} at commit {} does not end: after {} page{}, its Link "
                "rel=\"next\" leads back to {}, a page already fetched",
                spec_.repo_id, commit, page, page == 1 ? "" : "s", url)),
            hint, false);
      }
      if (page == kMaxListingPages) {
        throw HubRuleError(
            http_.redact(fmt::format("the file listing of {} at commit {} does not end: it goes "
                                     "on past {} pages (next: {})",
                                     spec_.repo_id, commit, kMaxListingPages, url)),
            hint, false);
      }
      HttpResponse response;
      try {
        response = http_.call("GET", url);
      } catch (const HubError& e) {
        if (e.error_code == "EntryNotFound" && !spec_.subfolder.empty()) {
          throw HubError(fmt::format("subfolder {} does not exist at commit {} ({})",
                                     spec_.subfolder, commit, e.what()),
                         e.status, e.error_code, false);
        }
        throw;
      }
      const json listing = parse_answer(response, settings_.token);
      if (!listing.is_array()) {
        throw HubError(http_.redact(fmt::format("GET {} answered no file list", response.url)), 0,
                       "", true);
      }
      for (const json& entry : listing) {
        if (!entry.is_object() || entry.value("type", json()) != "file") continue;
        const json& name = entry.contains("path") ? entry["path"] : entry;
        const json& bytes = entry.contains("size") ? entry["size"] : json(0);
        if (!name.is_string() || !bytes.is_number_integer() || bytes.get<int64_t>() < 0) {
          throw HubError(
              http_.redact(fmt::format("GET {} answered a file list entry without a "
                                       "path or size: {}",
                                       response.url, http_.redact(entry.dump()).substr(0, 200))),
              0, "", false);
        }
        const std::string path = name.get<std::string>();
        // The name becomes a path in the snapshot: it must stay inside it.
        if (const std::string reason = unsafe_name_reason(path); !reason.empty()) {
          throw HubRuleError(http_.redact(fmt::format(
                                 "the file listing of {} at commit {} names the entry "
                                 "'{}', which is no path inside the repo ({}); nothing "
                                 "was written for it",
                                 spec_.repo_id, commit, http_.redact(path).substr(0, 200), reason)),
                             hint + "; Strata only writes files inside the cache's snapshot folder",
                             false);
        }
        files.push_back({path, bytes.get<uint64_t>()});
      }
      url = next_link(response.header("link"));
    }
    return files;
  }

  // One file into the cache (docs/formats.md): HEAD for its etag, size and location, then
  // under the blob's lock a download unless the blob is there, then the snapshot pointer.
  void fetch(HubResolution& result, const RepoFile& file) {
    ++result.files;
    const std::string pointer = cache_.pointer_path(result.commit, file.path);
    if (fs::exists(pointer)) return;  // a complete snapshot file (a dangling link does not count)
    const std::string resolve =
        fmt::format("{}/{}/resolve/{}/{}", settings_.endpoint, spec_.repo_id,
                    url_quote(result.commit), url_quote(file.path, "/"));
    const HttpResponse head = http_.call("HEAD", resolve);
    const std::string etag = normalise_etag(
        !head.header("x-linked-etag").empty() ? head.header("x-linked-etag") : head.header("etag"));
    const bool redirect = head.status >= 300 && head.status < 400;
    const std::string size_text = !head.header("x-linked-size").empty()
                                      ? head.header("x-linked-size")
                                  : redirect ? ""
                                             : head.header("content-length");
    if (head.header("x-repo-commit").empty() || etag.empty() || size_text.empty() ||
        etag.find_first_of("/\\") != std::string::npos || !unsafe_name_reason(etag).empty()) {
      throw HubError(
          fmt::format("HEAD {} answered {} without a usable X-Repo-Commit, ETag and size", resolve,
                      head.status),
          head.status, "", false);
    }
    uint64_t size = 0;
    try {
      size = std::stoull(size_text);
    } catch (const std::exception&) {
      throw HubError(fmt::format("HEAD {}: size '{}' is not a number", resolve, size_text),
                     head.status, "", false);
    }
    const std::string location =
        redirect && !head.header("location").empty() ? head.header("location") : resolve;
    const FileLock lock(cache_.lock_path(etag));
    const std::string blob = cache_.blob_path(etag);
    if (!fs::exists(blob)) {
      const std::string incomplete = blob + ".incomplete";
      http_.download(location, incomplete, size, file.path);
      verify_blob(incomplete, etag, size, file.path);
      const mode_t mask = ::umask(0);
      ::umask(mask);
      fs::permissions(incomplete, static_cast<fs::perms>(0666 & ~mask), fs::perm_options::replace);
      rename_durable(incomplete, blob);
      ++result.downloaded;
      result.bytes += size;
    }
    cache_.link(result.commit, file.path, etag, settings_.symlinks);
  }

  const HubSpec& spec_;
  const HubSettings& settings_;
  const HubFileSet set_;
  const HubLog& log_;
  HubHttp http_;
  HubRepoCache cache_;
};

std::string hint_for(const HubError& e, const HubSpec& spec, const HubSettings& settings) {
  if (const auto* rule = dynamic_cast<const HubRuleError*>(&e)) return rule->hint;
  if (e.status == 401 || e.status == 403 || e.error_code == "GatedRepo" ||
      e.error_code == "RepoNotFound") {
    const std::string token =
        settings.token.empty() ? "no token is set"
                               : fmt::format("the token from {} was sent", settings.token_source);
    return fmt::format(
        "HINT: {}; for a private or gated repo set HF_TOKEN (or write the token to "
        "$HF_HOME/token) with a token that can read {}, and accept the repo's terms on "
        "the Hub if it is gated; check the repo id and that HF_ENDPOINT ({}) is right{}",
        token, spec.repo_id, settings.endpoint,
        spec.text.rfind("hf://", 0) == 0
            ? ""
            : fmt::format("; '{}' names no local file or directory either", spec.text));
  }
  if (e.error_code == "RevisionNotFound") {
    return fmt::format(
        "HINT: check the revision '{}' (a branch, a tag, a 40-hex commit or refs/pr/N)",
        spec_revision(spec));
  }
  if (e.transient) {
    return fmt::format(
        "HINT: the Hub at {} could not be reached or failed; retry later, or fill the cache "
        "elsewhere and set HF_HUB_OFFLINE=1",
        settings.endpoint);
  }
  return "HINT: check the spec, or download the repo and give its local directory";
}

// Whether a local path exists (a name too long for the file system does not).
bool local_path_exists(const std::string& path) {
  std::error_code ec;
  return fs::exists(path, ec);
}

// A resolution the cache alone answered: the files of `set` the snapshot directory holds.
HubResolution from_cache(const CachedSnapshot& cached, std::string how, HubFileSet set) {
  HubResolution result;
  result.dir = cached.dir;
  result.commit = cached.commit;
  result.how = std::move(how);
  for (const auto& entry : fs::directory_iterator(cached.dir)) {
    if (is_hub_file_in(set, entry.path().filename().string())) ++result.files;
  }
  return result;
}

}  // namespace

HubResolution resolve_hub_spec(const HubSpec& spec, const HubSettings& settings, const HubLog& log,
                               HubFileSet set) {
  if (settings.offline) {
    return from_cache(resolve_from_cache(spec, settings, "HF_HUB_OFFLINE is set", set),
                      "from the cache (HF_HUB_OFFLINE is set)", set);
  }
  try {
    return SnapshotDownload(spec, settings, log, set).run();
  } catch (const HubError& e) {
    const std::string message =
        redact_secrets(fmt::format("cannot resolve Hub spec '{}' ({}) from {}: {}", spec.text,
                                   describe_spec(spec), settings.endpoint, e.what()),
                       settings.token);
    // The Hub unreachable or refusing: the cache answers if it can (never for a revision the
    // Hub says does not exist, nor for an incomplete or inconsistent download).
    const bool cache_may_answer = e.transient || e.status == 401 || e.status == 403 ||
                                  e.error_code == "RepoNotFound" || e.error_code == "GatedRepo";
    if (cache_may_answer) {
      try {
        const std::string why = redact_secrets(e.what(), settings.token);
        HubResolution result =
            from_cache(resolve_from_cache(spec, settings, why, set),
                       fmt::format("from the cache, because the Hub failed: {}", why), set);
        log(fmt::format("hub: WARNING: {}; using the cached snapshot {}", message, result.dir));
        return result;
      } catch (const CheckpointError&) {
        // Not cached either: report the Hub's error.
      }
    }
    throw CheckpointError(redact_secrets(
        fmt::format("{}\n{}", message, hint_for(e, spec, settings)), settings.token));
  } catch (const IoError& e) {  // a local failure; its paths may hold names from the Hub
    throw IoError(redact_secrets(e.what(), settings.token));
  } catch (const CheckpointError& e) {
    throw CheckpointError(redact_secrets(e.what(), settings.token));
  }
}

namespace {

// resolve_model_path and resolve_tokenizer_path: `set` names the files fetched and checked.
std::string resolve_path(const std::string& path, const ProcessGroup* group, const HubLog& log,
                         HubFileSet set) {
  const bool several = group && group->world_size() > 1;
  std::optional<HubSpec> spec;
  if (!several) {
    spec = parse_hub_spec(path, local_path_exists(path));
  } else {
    // Every rank must take the same branch (a bare owner/repo is a local path where it exists):
    // agree first, so that no rank waits in a collective the others never reach.
    json mine;
    try {
      spec = parse_hub_spec(path, local_path_exists(path));
      mine["spec"] = spec.has_value();
    } catch (const std::exception& e) {
      mine["error"] = e.what();
    }
    const std::vector<std::string> views = group->all_gather_strings(mine.dump());
    std::set<bool> kinds;
    for (size_t r = 0; r < views.size(); ++r) {
      const json view = json::parse(views[r]);
      if (view.contains("error")) throw CheckpointError(view["error"].get<std::string>());
      kinds.insert(view["spec"].get<bool>());
    }
    if (kinds.size() > 1) {
      throw CheckpointError(
          fmt::format("'{}' is a local path on some ranks and a Hub spec on others (it exists on "
                      "some nodes only)\nHINT: write hf://{} for the Hub, or ./{} or an absolute "
                      "path for a directory every node has",
                      path, path, path));
    }
  }
  if (!spec) return path;
  const auto start = Clock::now();
  auto summary = [&](const HubResolution& r) {
    return fmt::format(
        "hub: {} -> commit {} ({}; {} files, {} downloaded, {:.1f} MiB, {:.1f} s) at {}", path,
        r.commit.substr(0, 12), r.how, r.files, r.downloaded,
        static_cast<double>(r.bytes) / (1 << 20),
        std::chrono::duration<double>(Clock::now() - start).count(), r.dir);
  };
  if (!several) {
    const HubResolution r = resolve_hub_spec(*spec, HubSettings::from_environment(), log, set);
    log(summary(r));
    return r.dir;
  }
  // Local rank 0 of each node resolves (the cache's file locks serialise nodes sharing one);
  // the rest wait in the all-gather that brings every outcome to every rank.
  json mine = {{"node", group->node_index()}, {"leader", group->local_rank() == 0}};
  if (group->local_rank() == 0) {
    try {
      const HubResolution r = resolve_hub_spec(*spec, HubSettings::from_environment(), log, set);
      mine["dir"] = r.dir;
      mine["commit"] = r.commit;
      mine["summary"] = summary(r);
    } catch (const std::exception& e) {
      mine["error"] = e.what();
    }
  }
  const std::vector<std::string> outcomes = group->all_gather_strings(mine.dump());
  std::string dir;
  for (size_t r = 0; r < outcomes.size(); ++r) {
    const json outcome = json::parse(outcomes[r]);
    if (outcome.contains("error")) {
      // The same text on every rank: the failure, which rank met it, then the hint.
      std::string message = outcome["error"];
      const size_t hint = std::min(message.find("\nHINT"), message.size());
      message.insert(
          hint, fmt::format(" (on rank {}, which downloaded for node {} ({}); every rank stops)", r,
                            outcome["node"].get<int>(),
                            group->node_hostnames().at(outcome["node"].get<size_t>())));
      throw CheckpointError(message);
    }
    if (outcome["leader"].get<bool>() && outcome["node"].get<int>() == group->node_index())
      dir = outcome["dir"];
  }
  // Nodes resolving a branch at different moments may see different commits.
  std::map<std::string, std::vector<std::string>> nodes_of;  // commit -> node hosts
  for (const std::string& text : outcomes) {
    const json outcome = json::parse(text);
    if (outcome["leader"].get<bool>()) {
      nodes_of[outcome["commit"]].push_back(
          group->node_hostnames().at(outcome["node"].get<size_t>()));
    }
  }
  if (nodes_of.size() > 1) {
    std::string list;
    for (const auto& [commit, hosts] : nodes_of)
      list += fmt::format("\n  {}: {}", commit, fmt::join(hosts, ", "));
    throw CheckpointError(fmt::format(
        "Hub spec '{}' resolved to different commits on different nodes (the revision "
        "moved during start-up):{}\nHINT: pin the commit: hf://{}@<40-hex commit>",
        path, list, spec->repo_id + (spec->subfolder.empty() ? "" : "/" + spec->subfolder)));
  }
  if (group->is_main()) log(json::parse(outcomes[0])["summary"].get<std::string>());
  // Every rank must see its node's snapshot before any starts loading.
  const std::vector<std::string> missing = missing_hub_files(set, dir);
  const std::string problem = missing.empty()
                                  ? ""
                                  : fmt::format("rank {} on {} cannot read {} (missing {})",
                                                group->rank(), group->hostname(), dir, missing[0]);
  for (const std::string& p : group->all_gather_strings(problem)) {
    if (!p.empty()) {
      throw CheckpointError(
          fmt::format("Hub spec '{}' resolved, but {}\nHINT: ranks of one node must share "
                      "HF_HOME / HF_HUB_CACHE",
                      path, p));
    }
  }
  return dir;
}

}  // namespace

std::string resolve_model_path(const std::string& path, const ProcessGroup* group,
                               const HubLog& log) {
  return resolve_path(path, group, log, HubFileSet::kModel);
}

std::string resolve_tokenizer_path(const std::string& path, const ProcessGroup* group,
                                   const HubLog& log) {
  // A bare name of a tokenizer or template file is a local path, missing or not: a mistyped
  // data/tokenizer.model is reported as such, not looked up on the Hub.
  if (path.rfind("hf://", 0) != 0) {
    const std::string name = fs::path(path).filename().string();
    for (const char* suffix : {".json", ".model", ".jinja"}) {
      const size_t n = std::strlen(suffix);
      if (name.size() > n && name.compare(name.size() - n, n, suffix) == 0) return path;
    }
  }
  return resolve_path(path, group, log, HubFileSet::kTokenizer);
}

}  // namespace strata
