// Hub spec grammar (docs/formats.md): valid forms and what they resolve to, invalid ones
// with the user's exact text in the message, and bare names vs local paths.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include "checkpoint/hub/spec.h"
#include "checkpoint/safetensors_header.h"

namespace strata {
namespace {

struct Valid {
  std::string text, repo, subfolder, revision;
};

TEST(HubSpec, ValidFormsResolve) {
  const std::string commit = "0123456789abcdef0123456789abcdef01234567";
  const std::vector<Valid> cases = {
      {"hf://meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B", "", ""},
      {"hf://owner/repo@main", "owner/repo", "", "main"},
      {"hf://owner/repo/sub", "owner/repo", "sub", ""},
      {"hf://owner/repo/a/b@v1.0", "owner/repo", "a/b", "v1.0"},
      {"hf://owner/repo@v1.0/a/b", "owner/repo", "a/b", "v1.0"},
      {"hf://owner/repo@" + commit, "owner/repo", "", commit},
      {"hf://owner/repo@refs/pr/12", "owner/repo", "", "refs/pr/12"},
      {"hf://owner/repo@refs/pr/12/adapter", "owner/repo", "adapter", "refs/pr/12"},
      {"hf://owner/repo@refs/convert/parquet", "owner/repo", "", "refs/convert/parquet"},
      {"hf://owner/repo/sub@refs%2Fpr%2F3", "owner/repo", "sub", "refs/pr/3"},
      {"hf://models/owner/repo", "owner/repo", "", ""},
      {"hf://owner/my_repo.v2/x_y-z", "owner/my_repo.v2", "x_y-z", ""},
      {"owner/repo", "owner/repo", "", ""},
      {"owner/repo/sub@dev", "owner/repo", "sub", "dev"},
  };
  for (const Valid& c : cases) {
    const auto spec = parse_hub_spec(c.text, /*local_path_exists=*/false);
    ASSERT_TRUE(spec.has_value()) << c.text;
    EXPECT_EQ(spec->repo_id, c.repo) << c.text;
    EXPECT_EQ(spec->subfolder, c.subfolder) << c.text;
    EXPECT_EQ(spec->revision, c.revision) << c.text;
    EXPECT_EQ(spec->text, c.text);
  }
}

TEST(HubSpec, InvalidFormsAreRejectedQuotingTheInput) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"hf://owner", "expected owner/repo"},
      {"hf://", "expected owner/repo"},
      {"hf://owner/repo/../secrets", "path segment '..' is not allowed"},
      {"hf://owner/repo/./x", "path segment '.' is not allowed"},
      {"hf://owner/repo//etc/passwd", "empty path segment"},
      {"hf://owner/repo/sub/", "empty path segment"},
      {"hf://owner/repo\\sub", "backslashes are not allowed"},
      {"hf://owner/repo@v1/sub@v2", "'@' appears in two places"},
      {"hf://owner/repo@", "empty revision after '@'"},
      {"hf://owner/repo/sub@", "empty revision after '@'"},
      {"hf://own er/repo", "may hold only letters"},
      {"hf://-owner/repo", "may not start or end with '-' or '.'"},
      {"hf://owner/re--po", "may not contain '--' or '..'"},
      {"hf://owner/repo.git", "may not end in '.git'"},
      {"hf://owner/repo@..%2Fx", "is not a branch, tag, commit"},
      {"hf://owner/repo@v%2", "bad percent-encoding"},
  };
  for (const auto& [text, expected] : cases) {
    try {
      parse_hub_spec(text, false);
      ADD_FAILURE() << "accepted: " << text;
    } catch (const CheckpointError& e) {
      const std::string message = e.what();
      EXPECT_NE(message.find("'" + text + "'"), std::string::npos) << message;
      EXPECT_NE(message.find(expected), std::string::npos) << text << " -> " << message;
    }
  }
}

TEST(HubSpec, RevisionsAndLengthsAreChecked) {
  auto message_of = [](const std::string& text) -> std::string {
    try {
      parse_hub_spec(text, false);
    } catch (const CheckpointError& e) {
      return e.what();
    }
    return "accepted: " + text;
  };
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"hf://o/r@refs/pr/abc",
       "revision 'refs/pr/abc' is no pull request: refs/pr/ must be followed by its number"},
      {"hf://o/r@refs%2Fpr%2Fabc", "refs/pr/ must be followed by its number"},
      {"hf://o/r/sub@refs%2Fpr%2F", "refs/pr/ must be followed by its number"},
      {"hf://o/r@refs/pr/1x/sub", "refs/pr/ must be followed by its number"},
      {"hf://o/r@main@main", "'@' appears in two places: give the revision once"},
      {"hf://o/r/sub@main@main", "'@' appears in two places: give the revision once"},
      {"o/r@a@b@c", "'@' appears 3 times: give the revision once"},
  };
  for (const auto& [text, expected] : cases) {
    const std::string message = message_of(text);
    EXPECT_NE(message.find(expected), std::string::npos) << text << " -> " << message;
    EXPECT_NE(message.find("HINT: "), std::string::npos) << message;
  }
  EXPECT_EQ(parse_hub_spec("hf://o/r@refs/pr/0", false)->revision, "refs/pr/0");

  // Over-long parts: a clear message, not the file system's "File name too long", and the
  // spec shortened in it.
  const std::string long_text(5000, 'a');
  std::string deep = "sub";  // 200 short components
  for (int i = 0; i < 200; ++i) deep += "/abcdef";
  const std::vector<std::pair<std::string, std::string>> too_long = {
      {"hf://o/" + long_text,
       "repo id part 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa...' is "
       "5000 characters long; the Hub allows at most 96"},
      {"hf://" + long_text + "/r", "is 5000 characters long; the Hub allows at most 96"},
      {"hf://o/r@" + long_text, "the revision is 5000 characters long; at most 256"},
      {"hf://o/r@" + std::string(257, 'v'), "the revision is 257 characters long; at most 256"},
      {"hf://o/r/" + long_text, "subfolder component 'aaaa"},
      {"hf://o/r/" + long_text, "is 5000 characters long; at most 255"},
      {"hf://o/r/" + deep, "the subfolder is 1403 characters long; at most 1024"},
      {"o/" + long_text, "is no existing local path, and not a Hub spec either"},
      {"hf://" + long_text, "expected owner/repo"},
  };
  for (const auto& [text, expected] : too_long) {
    const std::string message = message_of(text);
    EXPECT_NE(message.find(expected), std::string::npos) << text.substr(0, 60) << " -> " << message;
    EXPECT_LT(message.size(), 700u) << message;
    EXPECT_NE(message.find(fmt::format("...' ({} characters)", text.size())), std::string::npos)
        << message;
  }
  const std::string at_limit = "hf://" + std::string(96, 'o') + "/" + std::string(96, 'r');
  EXPECT_EQ(parse_hub_spec(at_limit, false)->repo_id.size(), 193u);
  EXPECT_EQ(parse_hub_spec("hf://o/r@" + std::string(256, 'v'), false)->revision.size(), 256u);
}

TEST(HubSpec, BareNamesAreLocalPathsFirst) {
  EXPECT_FALSE(parse_hub_spec("owner/repo", /*local_path_exists=*/true).has_value());
  EXPECT_FALSE(parse_hub_spec("checkpoints", false).has_value());  // no '/': a local name
  EXPECT_FALSE(parse_hub_spec("/abs/path", false).has_value());
  EXPECT_FALSE(parse_hub_spec("./runs/x", false).has_value());
  EXPECT_FALSE(parse_hub_spec("../runs/x", false).has_value());
  EXPECT_TRUE(parse_hub_spec("hf://owner/repo", true).has_value());  // hf:// is always the Hub
  try {
    parse_hub_spec("runs/a b/c", false);
    FAIL();
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find(
                  "'runs/a b/c' is no existing local path, and not a Hub spec either"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace strata
