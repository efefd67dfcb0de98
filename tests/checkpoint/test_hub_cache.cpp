// The HF cache layout (docs/formats.md): settings from the environment, folder names, refs
// without newline, relative snapshot symlinks, blob locks, what a source directory needs, and
// offline resolution with its messages.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>

#include "checkpoint/hub/cache.h"
#include "checkpoint/hub/http.h"
#include "checkpoint/safetensors_header.h"
#include "tests/common/temp_dir.h"

namespace strata {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

const std::string kCommit = "0123456789abcdef0123456789abcdef01234567";

// Sets (or, with nullopt, unsets) environment variables for one scope, restoring them after.
class ScopedEnv {
 public:
  explicit ScopedEnv(const std::map<std::string, std::optional<std::string>>& values) {
    for (const auto& [name, value] : values) {
      const char* old = std::getenv(name.c_str());
      saved_[name] = old ? std::optional<std::string>(old) : std::nullopt;
      if (value)
        setenv(name.c_str(), value->c_str(), 1);
      else
        unsetenv(name.c_str());
    }
  }
  ~ScopedEnv() {
    for (const auto& [name, value] : saved_) {
      if (value)
        setenv(name.c_str(), value->c_str(), 1);
      else
        unsetenv(name.c_str());
    }
  }

 private:
  std::map<std::string, std::optional<std::string>> saved_;
};

const std::map<std::string, std::optional<std::string>> kClean = {
    {"HF_HOME", std::nullopt},
    {"HF_HUB_CACHE", std::nullopt},
    {"HUGGINGFACE_HUB_CACHE", std::nullopt},
    {"XDG_CACHE_HOME", std::nullopt},
    {"HF_TOKEN", std::nullopt},
    {"HUGGING_FACE_HUB_TOKEN", std::nullopt},
    {"HF_TOKEN_PATH", std::nullopt},
    {"HF_HUB_OFFLINE", std::nullopt},
    {"TRANSFORMERS_OFFLINE", std::nullopt},
    {"HF_ENDPOINT", std::nullopt},
    {"HF_HUB_DISABLE_SYMLINKS", std::nullopt},
    {"HF_HUB_DISABLE_IMPLICIT_TOKEN", std::nullopt},
    {"STRATA_HUB_ATTEMPTS", std::nullopt},
    {"STRATA_HUB_MIN_RATE", std::nullopt},
    {"STRATA_HUB_MIN_RATE_AFTER", std::nullopt},
    {"STRATA_HUB_FILE_DEADLINE", std::nullopt},
    {"STRATA_HUB_MAX_RETRIES", std::nullopt}};

std::string read(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

void write(const fs::path& path, const std::string& content) {
  fs::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << content;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

TEST(HubSettings, CacheLocationFollowsHuggingfaceHub) {
  TempDir tmp;
  ScopedEnv clean(kClean);
  {
    ScopedEnv e({{"HOME", tmp.path().string()}});
    EXPECT_EQ(HubSettings::from_environment().cache_dir,
              (tmp.path() / ".cache/huggingface/hub").string());
  }
  {
    ScopedEnv e({{"XDG_CACHE_HOME", tmp / "xdg"}});
    EXPECT_EQ(HubSettings::from_environment().cache_dir, tmp / "xdg/huggingface/hub");
  }
  {
    ScopedEnv e({{"HF_HOME", tmp / "home"}, {"XDG_CACHE_HOME", tmp / "xdg"}});
    EXPECT_EQ(HubSettings::from_environment().cache_dir, tmp / "home/hub");
  }
  {
    ScopedEnv e({{"HF_HOME", tmp / "home"}, {"HUGGINGFACE_HUB_CACHE", tmp / "legacy"}});
    EXPECT_EQ(HubSettings::from_environment().cache_dir, tmp / "legacy");
  }
  {
    ScopedEnv e({{"HF_HUB_CACHE", "$STRATA_TEST_ROOT/c"},
                 {"HUGGINGFACE_HUB_CACHE", tmp / "legacy"},
                 {"STRATA_TEST_ROOT", tmp.path().string()}});
    EXPECT_EQ(HubSettings::from_environment().cache_dir, tmp / "c");  // $VAR expanded
  }
  {
    ScopedEnv e({{"HF_HOME", ""}, {"HOME", tmp.path().string()}});  // empty counts as unset
    EXPECT_EQ(HubSettings::from_environment().cache_dir,
              (tmp.path() / ".cache/huggingface/hub").string());
  }
}

TEST(HubSettings, EndpointTokenOfflineAndTimeouts) {
  TempDir tmp;
  ScopedEnv clean(kClean);
  ScopedEnv home({{"HF_HOME", tmp.path().string()}});
  HubSettings s = HubSettings::from_environment();
  EXPECT_EQ(s.endpoint, "https://huggingface.co");
  EXPECT_EQ(s.token, "");
  EXPECT_FALSE(s.offline);
  EXPECT_TRUE(s.symlinks);
  write(tmp.path() / "token", "  hf_from_file\r\n");
  s = HubSettings::from_environment();
  EXPECT_EQ(s.token, "hf_from_file");
  EXPECT_EQ(s.token_source, tmp / "token");
  {
    ScopedEnv e({{"HF_TOKEN", "hf_from_env"},
                 {"HF_ENDPOINT", "http://127.0.0.1:9/"},
                 {"HF_HUB_OFFLINE", "yes"},
                 {"HF_HUB_DISABLE_SYMLINKS", "1"}});
    s = HubSettings::from_environment();
    EXPECT_EQ(s.token, "hf_from_env");
    EXPECT_EQ(s.token_source, "HF_TOKEN");
    EXPECT_EQ(s.endpoint, "http://127.0.0.1:9");
    EXPECT_TRUE(s.offline);
    EXPECT_FALSE(s.symlinks);
  }
  {
    ScopedEnv e({{"HF_TOKEN", "hf_from_env"},
                 {"HF_HUB_DISABLE_IMPLICIT_TOKEN", "true"},
                 {"TRANSFORMERS_OFFLINE", "1"}});
    s = HubSettings::from_environment();
    EXPECT_EQ(s.token, "");
    EXPECT_TRUE(s.offline);
  }
  {
    ScopedEnv e({{"HF_HUB_OFFLINE", std::string("0")}});
    EXPECT_FALSE(HubSettings::from_environment().offline);
  }
  {
    ScopedEnv e({{"HF_HUB_ETAG_TIMEOUT", std::string("soon")}});
    EXPECT_NE(error_of([] {
                HubSettings::from_environment();
              }).find("HF_HUB_ETAG_TIMEOUT='soon' is not a positive number"),
              std::string::npos);
  }
  {
    ScopedEnv e({{"STRATA_HUB_ATTEMPTS", std::string("0")}});
    EXPECT_NE(error_of([] { HubSettings::from_environment(); }).find("STRATA_HUB_ATTEMPTS='0'"),
              std::string::npos);
  }
}

TEST(HubSettings, BoundsOfOneFileDownload) {
  ScopedEnv clean(kClean);
  HubSettings s = HubSettings::from_environment();
  EXPECT_EQ(s.min_rate, 1024);
  EXPECT_EQ(s.min_rate_after_s, 60);
  EXPECT_EQ(s.file_deadline_s, 0);  // none
  EXPECT_EQ(s.max_retries, 100);
  {
    ScopedEnv e({{"STRATA_HUB_MIN_RATE", std::string("0")},
                 {"STRATA_HUB_MIN_RATE_AFTER", std::string("2.5")},
                 {"STRATA_HUB_FILE_DEADLINE", std::string("30")},
                 {"STRATA_HUB_MAX_RETRIES", std::string("0")}});
    s = HubSettings::from_environment();
    EXPECT_EQ(s.min_rate, 0);
    EXPECT_EQ(s.min_rate_after_s, 2.5);
    EXPECT_EQ(s.file_deadline_s, 30);
    EXPECT_EQ(s.max_retries, 0);
  }
  for (const auto& [name, value, expected] : std::vector<std::array<std::string, 3>>{
           {"STRATA_HUB_MIN_RATE", "-1", "STRATA_HUB_MIN_RATE='-1' is not a number >= 0"},
           {"STRATA_HUB_MIN_RATE_AFTER", "soon", "STRATA_HUB_MIN_RATE_AFTER='soon'"},
           {"STRATA_HUB_FILE_DEADLINE", "1h", "STRATA_HUB_FILE_DEADLINE='1h'"},
           {"STRATA_HUB_MAX_RETRIES", "-2", "STRATA_HUB_MAX_RETRIES='-2' is not an integer >= 0"},
           {"STRATA_HUB_MAX_RETRIES", "3.5", "STRATA_HUB_MAX_RETRIES='3.5'"}}) {
    ScopedEnv e({{name, std::optional<std::string>(value)}});
    EXPECT_NE(error_of([] { HubSettings::from_environment(); }).find(expected), std::string::npos)
        << name << "=" << value;
  }
}

TEST(HubRedaction, SecretsFromServersNeverReachMessages) {
  const std::string token = "hf_e2e_secret_7f3a9c";
  const std::string real = "hf_" + std::string("AbCdEfGhIjKlMnOpQrStUvWxYz01234567");
  const std::vector<std::pair<std::string, std::string>> cases = {
      // the token itself, anywhere, also percent-encoded in a URL
      {"Invalid credentials (got Authorization: Bearer " + token + ")",
       "Invalid credentials (got Authorization: Bearer <redacted>)"},
      {"proxy saw " + token + token, "proxy saw <redacted><redacted>"},
      {"GET http://127.0.0.1:8/_echo/Bearer%20" + token + " failed",
       "GET http://127.0.0.1:8/_echo/Bearer%20<redacted> failed"},
      // credentials after Bearer and Authorization, whatever the token
      {"authorization: Bearer abc.def-ghi", "authorization: Bearer <redacted>"},
      {"{\"Authorization\": \"Bearer other\"}", "{\"Authorization\": \"Bearer <redacted>\"}"},
      {"{\"authorization\":\"zzz\"}", "{\"authorization\":\"<redacted>\"}"},
      {"Authorization=Basic dXNlcjpwYXNz, next", "Authorization=<redacted>, next"},
      {"BEARER\tq1w2e3", "BEARER\t<redacted>"},
      // anything shaped like a Hub token
      {"token " + real + " rejected", "token <redacted> rejected"},
      // user:password@ of a URL
      {"redirected to https://user:pa55@cdn.example/x",
       "redirected to https://<redacted>@cdn.example/x"},
      // ordinary text stays as it is
      {"Invalid credentials in Authorization header",
       "Invalid credentials in Authorization header"},
      {"HTTP 404 (RepoNotFound: Repository not found) for GET http://h/api/models/o/r",
       "HTTP 404 (RepoNotFound: Repository not found) for GET http://h/api/models/o/r"},
      {"hf://owner/repo@main and hf_export.json", "hf://owner/repo@main and hf_export.json"},
      {"", ""},
  };
  for (const auto& [text, expected] : cases)
    EXPECT_EQ(redact_secrets(text, token), expected) << text;
  // Without a token the patterns still apply; the token is also found percent-encoded.
  EXPECT_EQ(redact_secrets("Bearer x", ""), "Bearer <redacted>");
  EXPECT_EQ(redact_secrets("a=tok%2Fen b", "tok/en"), "a=<redacted> b");
  // A body is redacted before it is cut to an excerpt: no prefix of a secret survives a cut.
  const std::string body = std::string(190, '.') + " " + token;
  EXPECT_EQ(redact_secrets(body, token).substr(0, 200).find("hf_e2e"), std::string::npos);
}

TEST(HubRepoCache, LayoutRefsAndLinks) {
  TempDir tmp;
  const HubRepoCache cache(tmp.path().string(), "owner/my-repo");
  EXPECT_EQ(cache.repo_dir(), tmp / "models--owner--my-repo");
  EXPECT_EQ(cache.blob_path("abc"), tmp / "models--owner--my-repo/blobs/abc");
  EXPECT_EQ(cache.lock_path("abc"), tmp / ".locks/models--owner--my-repo/abc.lock");
  EXPECT_EQ(cache.pointer_path(kCommit, "sub/a.json"),
            tmp / ("models--owner--my-repo/snapshots/" + kCommit + "/sub/a.json"));

  cache.prepare();
  EXPECT_TRUE(fs::is_directory(tmp / "models--owner--my-repo/blobs"));
  EXPECT_EQ(read(tmp / "CACHEDIR.TAG").rfind("Signature: 8a477f597d28d172789f06886806bc55\n", 0),
            0u);

  EXPECT_FALSE(cache.read_ref("main").has_value());
  cache.write_ref("main", kCommit);
  cache.write_ref("refs/pr/1", kCommit);
  cache.write_ref(kCommit, kCommit);  // a commit gets no ref
  EXPECT_EQ(read(tmp / "models--owner--my-repo/refs/main"),
            kCommit);  // exactly 40 bytes, no newline
  EXPECT_EQ(read(tmp / "models--owner--my-repo/refs/refs/pr/1"), kCommit);
  EXPECT_FALSE(fs::exists(tmp / ("models--owner--my-repo/refs/" + kCommit)));
  EXPECT_EQ(cache.read_ref("refs/pr/1"), kCommit);
  write(tmp / "models--owner--my-repo/refs/broken", "not a commit");
  EXPECT_FALSE(cache.read_ref("broken").has_value());

  write(cache.blob_path("e1"), "content");
  cache.link(kCommit, "a.json", "e1", true);
  cache.link(kCommit, "sub/dir/b.json", "e1", true);
  EXPECT_EQ(fs::read_symlink(cache.pointer_path(kCommit, "a.json")).string(), "../../blobs/e1");
  EXPECT_EQ(fs::read_symlink(cache.pointer_path(kCommit, "sub/dir/b.json")).string(),
            "../../../../blobs/e1");
  EXPECT_EQ(read(cache.pointer_path(kCommit, "sub/dir/b.json")), "content");
  cache.link(kCommit, "c.json", "e1", false);  // HF_HUB_DISABLE_SYMLINKS: a copy
  EXPECT_FALSE(fs::is_symlink(cache.pointer_path(kCommit, "c.json")));
  EXPECT_EQ(read(cache.pointer_path(kCommit, "c.json")), "content");
  for (const auto& entry : fs::recursive_directory_iterator(tmp.path())) {
    EXPECT_EQ(entry.path().string().find(".tmp"), std::string::npos) << entry.path();
  }
}

TEST(FileLock, ExcludesOtherProcesses) {
  TempDir tmp;
  const std::string path = tmp / ".locks/models--a--b/e.lock";
  auto other_can_lock = [&] {
    const pid_t child = fork();
    if (child == 0) {
      const int fd = ::open(path.c_str(), O_RDWR);
      _exit(fd >= 0 && ::flock(fd, LOCK_EX | LOCK_NB) == 0 ? 0 : 1);
    }
    int status = 0;
    waitpid(child, &status, 0);
    return WIFEXITED(status) && WEXITSTATUS(status) == 0;
  };
  {
    const FileLock lock(path);
    EXPECT_EQ(fs::status(path).permissions() & fs::perms::owner_write, fs::perms::owner_write);
    EXPECT_FALSE(other_can_lock());
  }
  EXPECT_TRUE(fs::exists(path));  // lock files stay, as huggingface_hub leaves them
  EXPECT_TRUE(other_can_lock());
}

TEST(HubFiles, LoadableNamesAndUrlQuoting) {
  for (const char* name :
       {"model.safetensors", "model-00001-of-00002.safetensors", "config.json", "tokenizer.model",
        "config.yaml", "latest", "merges.txt", "adapter_model.safetensors"}) {
    EXPECT_TRUE(is_loadable_hub_file(name)) << name;
  }
  for (const char* name :
       {"pytorch_model.bin", "README.md", "model.gguf", ".gitattributes", "consolidated.00.pth"}) {
    EXPECT_FALSE(is_loadable_hub_file(name)) << name;
  }
  EXPECT_EQ(url_quote("refs/pr/1"), "refs%2Fpr%2F1");
  EXPECT_EQ(url_quote("main"), "main");
  EXPECT_EQ(url_quote("sub dir/a+b.json", "/"), "sub%20dir/a%2Bb.json");
  EXPECT_TRUE(is_commit_hash(kCommit));
  EXPECT_FALSE(is_commit_hash("0123456789ABCDEF0123456789abcdef01234567"));
  EXPECT_FALSE(is_commit_hash("main"));
}

TEST(HubFiles, MissingSourceFiles) {
  TempDir tmp;
  const fs::path hf = tmp.path() / "hf";
  write(hf / "config.json", "{}");
  ASSERT_EQ(missing_source_files(hf.string()).size(), 1u);
  EXPECT_NE(missing_source_files(hf.string())[0].find("model.safetensors"), std::string::npos);
  write(
      hf / "model.safetensors.index.json",
      R"({"metadata":{"total_size":8},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}})");
  write(hf / "model-00001-of-00002.safetensors", "x");
  EXPECT_EQ(missing_source_files(hf.string()),
            std::vector<std::string>{(hf / "model-00002-of-00002.safetensors").string()});
  write(hf / "model-00002-of-00002.safetensors", "x");
  EXPECT_TRUE(missing_source_files(hf.string()).empty());

  const fs::path peft = tmp.path() / "peft";
  write(peft / "adapter_config.json", "{}");
  EXPECT_EQ(missing_source_files(peft.string()),
            std::vector<std::string>{(peft / "adapter_model.safetensors").string()});

  const fs::path run = tmp.path() / "run";
  write(run / "latest", "step-0000010");
  EXPECT_EQ(missing_source_files(run.string()),
            std::vector<std::string>{(run / "step-0000010/metadata.json").string()});
  write(run / "step-0000010/metadata.json", R"({"files":{"rank-00000.safetensors":{}}})");
  write(run / "step-0000010/train_state.json", "{}");
  write(run / "step-0000010/config.yaml", "");
  EXPECT_EQ(missing_source_files(run.string()),
            std::vector<std::string>{(run / "step-0000010/rank-00000.safetensors").string()});
  write(run / "step-0000010/rank-00000.safetensors", "");
  EXPECT_TRUE(missing_source_files(run.string()).empty());

  const fs::path empty = tmp.path() / "empty";
  fs::create_directories(empty);
  ASSERT_EQ(missing_source_files(empty.string()).size(), 1u);
  EXPECT_NE(missing_source_files(empty.string())[0].find("config.json (an HF model)"),
            std::string::npos);
}

TEST(HubFiles, TokenizerSetHoldsTheTokenizerFilesOnly) {
  for (const char* name :
       {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"}) {
    EXPECT_TRUE(is_hub_file_in(HubFileSet::kTokenizer, name)) << name;
    EXPECT_TRUE(is_hub_file_in(HubFileSet::kModel, name)) << name;
  }
  for (const char* name :
       {"model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
        "config.json", "generation_config.json", "latest", "pytorch_model.bin", "README.md",
        "tokenizer.json.bak", "sub/tokenizer.json"}) {
    EXPECT_FALSE(is_hub_file_in(HubFileSet::kTokenizer, name)) << name;
  }
  EXPECT_TRUE(is_hub_file_in(HubFileSet::kModel, "model.safetensors"));
  EXPECT_EQ(describe_hub_file_set(HubFileSet::kTokenizer),
            "tokenizer file (tokenizer.json, tokenizer_config.json, tokenizer.model, "
            "special_tokens_map.json)");

  TempDir tmp;
  const fs::path dir = tmp.path() / "tok";
  write(dir / "tokenizer_config.json", "{}");
  write(dir / "model.safetensors", "x");
  EXPECT_EQ(missing_hub_files(HubFileSet::kTokenizer, dir.string()),
            std::vector<std::string>{(dir / "tokenizer.json").string() +
                                     " or tokenizer.model (a tokenizer)"});
  write(dir / "tokenizer.model", "x");
  EXPECT_TRUE(missing_hub_files(HubFileSet::kTokenizer, dir.string()).empty());
  fs::remove(dir / "tokenizer.model");
  write(dir / "tokenizer.json", "{}");
  EXPECT_TRUE(missing_hub_files(HubFileSet::kTokenizer, dir.string()).empty());
  // A model needs more than its tokenizer.
  EXPECT_FALSE(missing_hub_files(HubFileSet::kModel, dir.string()).empty());
}

TEST(HubOffline, TokenizerFromACacheWithoutWeights) {
  TempDir tmp;
  ScopedEnv clean(kClean);
  ScopedEnv e({{"HF_HUB_CACHE", tmp.path().string()}, {"HF_HUB_OFFLINE", "1"}});
  const HubSettings settings = HubSettings::from_environment();
  const HubSpec spec = *parse_hub_spec("hf://owner/repo/sub", false);
  std::string message = error_of(
      [&] { resolve_from_cache(spec, settings, "HF_HUB_OFFLINE is set", HubFileSet::kTokenizer); });
  EXPECT_NE(message.find("hf download owner/repo --revision main --include 'sub/tokenizer*' "
                         "'sub/special_tokens_map.json'"),
            std::string::npos)
      << message;

  const HubRepoCache cache(settings.cache_dir, "owner/repo");
  cache.write_ref("main", kCommit);
  write(cache.blob_path("c"), "{}");
  cache.link(kCommit, "sub/tokenizer_config.json", "c", true);
  message =
      error_of([&] { resolve_from_cache(spec, settings, "offline", HubFileSet::kTokenizer); });
  EXPECT_NE(message.find("is incomplete:\n  missing: " + cache.snapshot_dir(kCommit) +
                         "/sub/tokenizer.json or tokenizer.model (a tokenizer)"),
            std::string::npos)
      << message;

  write(cache.blob_path("t"), "{}");
  cache.link(kCommit, "sub/tokenizer.json", "t", true);
  // The tokenizer alone: enough for a tokenizer, not for a model.
  EXPECT_EQ(resolve_from_cache(spec, settings, "offline", HubFileSet::kTokenizer).dir,
            cache.snapshot_dir(kCommit) + "/sub");
  message = error_of([&] { resolve_from_cache(spec, settings, "offline"); });
  EXPECT_NE(message.find("is incomplete:"), std::string::npos) << message;

  // A huggingface_hub listing names the tokenizer files that must be there, not the weights.
  write(fs::path(cache.repo_dir()) / "trees" / (kCommit + ".json"),
        R"({"format_version":1,"files":{"sub/tokenizer.json":{"size":2},)"
        R"("sub/model.safetensors":{"size":7},"sub/special_tokens_map.json":{"size":2}}})");
  message =
      error_of([&] { resolve_from_cache(spec, settings, "offline", HubFileSet::kTokenizer); });
  EXPECT_NE(
      message.find("missing: " + cache.snapshot_dir(kCommit) + "/sub/special_tokens_map.json"),
      std::string::npos)
      << message;
  EXPECT_EQ(message.find("model.safetensors"), std::string::npos) << message;
}

TEST(HubOffline, ResolvesBranchesCommitsAndReportsWhatIsMissing) {
  TempDir tmp;
  ScopedEnv clean(kClean);
  ScopedEnv e({{"HF_HUB_CACHE", tmp.path().string()}, {"HF_HUB_OFFLINE", "1"}});
  const HubSettings settings = HubSettings::from_environment();
  HubSpec spec = *parse_hub_spec("hf://owner/repo/sub@main", false);

  std::string message =
      error_of([&] { resolve_from_cache(spec, settings, "HF_HUB_OFFLINE is set"); });
  EXPECT_NE(
      message.find(
          "Hub spec 'hf://owner/repo/sub@main' (repo owner/repo, subfolder sub, revision main) is "
          "not available: HF_HUB_OFFLINE is set, and it is not in the cache"),
      std::string::npos)
      << message;
  EXPECT_NE(message.find("refs/main (the revision has never been downloaded)"), std::string::npos)
      << message;
  EXPECT_NE(message.find("hf download owner/repo --revision main --include 'sub/*'"),
            std::string::npos)
      << message;

  const HubRepoCache cache(settings.cache_dir, "owner/repo");
  cache.write_ref("main", kCommit);
  message = error_of([&] { resolve_from_cache(spec, settings, "offline"); });
  EXPECT_NE(message.find("no directory " + cache.snapshot_dir(kCommit) + "/sub"), std::string::npos)
      << message;

  write(cache.blob_path("c"), "{}");
  cache.link(kCommit, "sub/config.json", "c", true);
  message = error_of([&] { resolve_from_cache(spec, settings, "offline"); });
  EXPECT_NE(message.find("is incomplete:\n  missing: " + cache.snapshot_dir(kCommit) +
                         "/sub/model.safetensors"),
            std::string::npos)
      << message;

  write(cache.blob_path("w"), "weights");
  cache.link(kCommit, "sub/model.safetensors", "w", true);
  CachedSnapshot found = resolve_from_cache(spec, settings, "offline");
  EXPECT_EQ(found.commit, kCommit);
  EXPECT_EQ(found.dir, cache.snapshot_dir(kCommit) + "/sub");

  // A commit needs no ref; an unknown one is not cached.
  spec = *parse_hub_spec("hf://owner/repo/sub@" + kCommit, false);
  EXPECT_EQ(resolve_from_cache(spec, settings, "offline").dir,
            cache.snapshot_dir(kCommit) + "/sub");
  spec = *parse_hub_spec("hf://owner/repo/sub@" + std::string(40, 'a'), false);
  EXPECT_NE(error_of([&] { resolve_from_cache(spec, settings, "offline"); }).find("no directory"),
            std::string::npos);

  // A listing written by huggingface_hub (trees/<commit>.json) names files that must be there.
  write(
      fs::path(cache.repo_dir()) / "trees" / (kCommit + ".json"),
      R"({"format_version":1,"files":{"sub/config.json":{"size":2},"sub/model.safetensors":{"size":7},)"
      R"("sub/tokenizer.model":{"size":3},"sub/README.md":{"size":1}}})");
  spec = *parse_hub_spec("hf://owner/repo/sub", false);
  message = error_of([&] { resolve_from_cache(spec, settings, "offline"); });
  EXPECT_NE(message.find("missing: " + cache.snapshot_dir(kCommit) + "/sub/tokenizer.model"),
            std::string::npos)
      << message;
  EXPECT_EQ(message.find("README.md"), std::string::npos) << message;
}

}  // namespace
}  // namespace strata
