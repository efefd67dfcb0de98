// What Strata reads from files other people made: path confinement (absolute names, '..',
// percent-encoded forms, symbolic links, the HF cache's links into blobs/), JSON documents
// (duplicate keys, nesting, sizes, errors naming the file), metadata.json's schema, and the
// `latest` pointer and step directories a checkpoint folder may hold.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "checkpoint/checkpoint_manager.h"
#include "checkpoint/checkpoint_metadata.h"
#include "checkpoint/file_io.h"
#include "checkpoint/json_file.h"
#include "checkpoint/safe_path.h"
#include "checkpoint/sharded_checkpoint.h"
#include "tests/common/temp_dir.h"

namespace strata {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

#define EXPECT_HAS(text, part) EXPECT_NE(std::string(text).find(part), std::string::npos) << (text)

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const CheckpointError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected CheckpointError";
  return "";
}

void touch(const fs::path& path, const std::string& content = "x") {
  fs::create_directories(path.parent_path());
  std::ofstream(path) << content;
}

TEST(PathInside, AcceptsPlainRelativeNames) {
  TempDir dir;
  touch(dir.path() / "a" / "b.safetensors");
  EXPECT_EQ(path_inside(dir.path().string(), "a/b.safetensors", "test"),
            (dir.path() / "a/b.safetensors").string());
  EXPECT_EQ(path_inside(dir.path().string(), "not-yet-there.json", "test"),
            (dir.path() / "not-yet-there.json").string());
  EXPECT_EQ(unsafe_name_reason("model-00001-of-00002.safetensors"), "");
  EXPECT_EQ(unsafe_name_reason("sub/dir/file..name"), "");  // '..' inside a name is fine
}

TEST(PathInside, RefusesAbsoluteClimbingAndEncodedNames) {
  TempDir dir;
  const std::string base = dir.path().string();
  EXPECT_HAS(error_of([&] { path_inside(base, "/etc/passwd", "index.json: weight_map[\"w\"]"); }),
             "index.json: weight_map[\"w\"]: '/etc/passwd' is not a file name inside");
  EXPECT_HAS(unsafe_name_reason("/etc/passwd"), "absolute");
  EXPECT_HAS(unsafe_name_reason("../x"), "'..'");
  EXPECT_HAS(unsafe_name_reason("a/../../x"), "'..'");
  EXPECT_HAS(unsafe_name_reason("a/.."), "'..'");
  EXPECT_HAS(unsafe_name_reason("./x"), "'.'");
  EXPECT_HAS(unsafe_name_reason("a//b"), "empty component");
  EXPECT_HAS(unsafe_name_reason(""), "empty");
  EXPECT_HAS(unsafe_name_reason("a\\..\\b"), "backslash");
  EXPECT_HAS(unsafe_name_reason(std::string("a\0b", 3)), "control character");
  EXPECT_HAS(unsafe_name_reason("a\nb"), "control character");
  EXPECT_HAS(unsafe_name_reason("%2e%2e/x"), "'..'");
  EXPECT_HAS(unsafe_name_reason("%2E%2E%2Fx"), "'..'");
  EXPECT_HAS(unsafe_name_reason("%252e%252e/x"), "'..'");  // encoded twice
  EXPECT_HAS(unsafe_name_reason("%2fetc%2fpasswd"), "absolute");
  EXPECT_HAS(unsafe_name_reason("a%5c..%5cb"), "backslash");
  EXPECT_HAS(unsafe_name_reason("a%00b"), "NUL");
  EXPECT_HAS(unsafe_name_reason("sub/" + std::string(256, 'a')), "a component is 256 bytes long");
  EXPECT_HAS(unsafe_name_reason(std::string(5000, 'a')), "5000 bytes long, more than 4096");
  EXPECT_EQ(unsafe_name_reason(std::string(255, 'a')), "");
}

TEST(PathInside, FollowsSymlinksAndRefusesThoseThatLeave) {
  TempDir dir;
  const fs::path base = dir.path() / "ck";
  touch(dir.path() / "outside.safetensors");
  touch(base / "inside.safetensors");
  fs::create_symlink("../outside.safetensors", base / "rank-00000.safetensors");
  fs::create_symlink("inside.safetensors", base / "alias.safetensors");
  fs::create_directory_symlink(dir.path(), base / "up");
  EXPECT_HAS(
      error_of([&] { path_inside(base.string(), "rank-00000.safetensors", "meta"); }),
      "resolves through a symbolic link to " + (dir.path() / "outside.safetensors").string());
  EXPECT_HAS(error_of([&] { path_inside(base.string(), "up/outside.safetensors", "meta"); }),
             "outside " + base.string());
  EXPECT_EQ(path_inside(base.string(), "alias.safetensors", "meta"),
            (base / "alias.safetensors").string());
}

TEST(PathInside, AHubCacheSnapshotMayLinkIntoItsBlobs) {
  TempDir dir;
  const fs::path repo = dir.path() / "hub" / "models--owner--name";
  const fs::path snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567";
  touch(repo / "blobs" / "abc");
  fs::create_directories(snapshot);
  fs::create_symlink("../../blobs/abc", snapshot / "model.safetensors");
  EXPECT_EQ(confinement_root(snapshot.string()), repo.string());
  EXPECT_EQ(confinement_root((snapshot / "sub").string()), repo.string());
  EXPECT_EQ(confinement_root(dir.path().string()), dir.path().string());
  EXPECT_EQ(path_inside(snapshot.string(), "model.safetensors", "index",
                        confinement_root(snapshot.string())),
            (snapshot / "model.safetensors").string());
  touch(dir.path() / "secret");
  fs::create_symlink("../../../../secret", snapshot / "evil.safetensors");
  EXPECT_HAS(error_of([&] {
               path_inside(snapshot.string(), "evil.safetensors", "index",
                           confinement_root(snapshot.string()));
             }),
             "outside " + repo.string());
}

TEST(JsonDocument, DuplicateKeysDepthAndSyntaxErrorsNameTheFile) {
  EXPECT_EQ(
      parse_json_document(R"({"a": {"b": 1}, "c": [{"b": 2}, {"b": 3}]})", "f.json")["c"][1]["b"],
      3);
  EXPECT_HAS(error_of([] { parse_json_document(R"({"step": 7, "step": -1})", "m.json"); }),
             "m.json is not valid JSON: the key \"step\" appears twice in one object");
  EXPECT_HAS(error_of([] { parse_json_document(R"({"t": {"w": 1, "w": 2}})", "m.json"); }),
             "the key \"w\" appears twice");
  EXPECT_HAS(error_of([] {
               parse_json_document(std::string(100, '[') + std::string(100, ']'), "d.json");
             }),
             "d.json is not valid JSON: nesting deeper than 64 levels");
  const std::string e = error_of([] { parse_json_document("{\"a\": ", "x/metadata.json"); });
  EXPECT_HAS(e, "x/metadata.json is not valid JSON: parse error at line 1");
  EXPECT_EQ(e.find("[json.exception"), std::string::npos) << e;
}

TEST(JsonDocument, FilesAreSizeCheckedBeforeReading) {
  TempDir dir;
  touch(dir.path() / "big.json", "[" + std::string(100, ' ') + "]");
  EXPECT_HAS(error_of([&] { read_json_file(dir / "big.json", 50); }),
             "big.json is 102 bytes, more than the 50 a JSON document may have");
  EXPECT_HAS(error_of([&] { read_json_file(dir / "missing.json"); }), "cannot read");
  EXPECT_HAS(error_of([&] { read_json_file(dir.path().string()); }), "is not a regular file");
}

// A valid metadata.json of one 2x3 F32 tensor in two rank files.
nlohmann::json good_metadata() {
  const nlohmann::json file = {{"size", 96},
                               {"sha256", std::string(64, 'a')},
                               {"block_bytes", 4194304},
                               {"block_xxh3", "0123456789abcdef"}};
  return {{"format", "strata-checkpoint"},
          {"format_version", 1},
          {"step", 7},
          {"world_size", 2},
          {"files", {{"rank-00000.safetensors", file}, {"rank-00001.safetensors", file}}},
          {"tensors",
           {{"w",
             {{"dtype", "F32"},
              {"shape", {2, 3}},
              {"chunks",
               {{{"file", "rank-00000.safetensors"}, {"key", "w"}, {"begin", 0}, {"end", 4}},
                {{"file", "rank-00001.safetensors"}, {"key", "w"}, {"begin", 4}, {"end", 6}}}}}}}}};
}

std::string metadata_error(const nlohmann::json& meta, const std::string& dir = "ck/step-0000007") {
  return error_of([&] { validate_checkpoint_metadata(meta, dir + "/metadata.json", dir); });
}

TEST(CheckpointMetadata, ValidatesTheSchemaAndNamesTheField) {
  const CheckpointMetadata parsed =
      validate_checkpoint_metadata(good_metadata(), "m.json", "ck/step-0000007");
  EXPECT_EQ(parsed.step, 7);
  EXPECT_EQ(parsed.tensors.at("w").chunks.size(), 2u);
  nlohmann::json m = good_metadata();
  m["step"] = -6;
  EXPECT_HAS(metadata_error(m, "ck/run"),
             "ck/run/metadata.json is not a valid Strata checkpoint "
             "description: step = -6 must be >= 0");
  m = good_metadata();
  EXPECT_HAS(metadata_error(m, "ck/step-0000009"),
             "\"step\" is 7 but the directory is step-0000009");
  m["step"] = 7.5;
  EXPECT_HAS(metadata_error(m), "step is not an integer");
  m = good_metadata();
  m["tensors"]["w"]["shape"] = {-2, -3};
  EXPECT_HAS(metadata_error(m), "tensors[\"w\"].shape[] = -2 must be >= 0");
  m["tensors"]["w"]["shape"] = {4294967296LL, 4294967296LL, 4294967296LL};
  EXPECT_HAS(metadata_error(m), "has more elements than an int64 holds");
  m = good_metadata();
  m["tensors"]["w"]["chunks"][0]["offset"] = 1;
  EXPECT_HAS(metadata_error(m), "tensors[\"w\"].chunks[] has an unknown field \"offset\"");
  m = good_metadata();
  m["tensors"]["w"]["extra"] = 1;
  EXPECT_HAS(metadata_error(m), "tensors[\"w\"] has an unknown field \"extra\"");
  m = good_metadata();
  m["tensors"]["w"]["chunks"][1]["begin"] = -4;
  EXPECT_HAS(metadata_error(m), "tensors[\"w\"].chunks[].begin = -4 must be >= 0");
  m = good_metadata();
  m["files"]["rank-00000.safetensors"]["sha256"] = "xyz";
  EXPECT_HAS(metadata_error(m), "files[\"rank-00000.safetensors\"].sha256 is not 64");
  m = good_metadata();
  m["files"]["rank-00000.safetensors"]["size"] = 5000000;  // two blocks, one checksum
  EXPECT_HAS(metadata_error(m), "block_xxh3 is not 2 block checksum(s)");
  m = good_metadata();
  m["files"]["rank-00000.safetensors"]["block_bytes"] = 0;
  EXPECT_HAS(metadata_error(m), "block_bytes = 0 must be >= 1");
  m = good_metadata();
  m["world_size"] = 0;
  EXPECT_HAS(metadata_error(m), "world_size = 0 must be >= 1");
  m = good_metadata();
  m["model_only"] = "yes";
  EXPECT_HAS(metadata_error(m), "\"model_only\" is not true or false");
  m = good_metadata();
  m["tensors"] = nlohmann::json::array();
  EXPECT_HAS(metadata_error(m), "\"tensors\" is not an object");
}

TEST(CheckpointMetadata, RankFileNamesStayInsideTheStepDirectory) {
  for (const std::string& name :
       {std::string("../outside.safetensors"), std::string("/etc/passwd"),
        std::string("sub/rank-00000.safetensors"), std::string("%2e%2e/rank-00000.safetensors"),
        std::string("rank-0.safetensors")}) {
    nlohmann::json m = good_metadata();
    m["files"][name] = m["files"]["rank-00000.safetensors"];
    m["files"].erase("rank-00000.safetensors");
    m["tensors"]["w"]["chunks"][0]["file"] = name;
    EXPECT_HAS(metadata_error(m), "files[\"" + name + "\"] is not a rank file name");
  }
}

TEST(FindCheckpoint, TheLatestPointerNamesACommittedStepOfItsFolder) {
  TempDir dir;
  const std::string folder = dir / "ck";
  touch(fs::path(folder) / "step-0000010" / "metadata.json", "{}");
  touch(dir.path() / "other" / "step-0000020" / "metadata.json", "{}");
  for (const std::string& pointer :
       {std::string("../other/step-0000020"), (dir.path() / "other/step-0000020").string(),
        std::string("step-0000010/../../other/step-0000020"), std::string("latest")}) {
    write_file_atomic(folder + "/latest", pointer + "\n");
    EXPECT_HAS(error_of([&] { find_checkpoint(folder); }),
               "/latest names '" + pointer + "', which is not a step directory of that folder");
  }
  write_file_atomic(folder + "/latest", "step-0000030\n");
  EXPECT_HAS(error_of([&] { find_checkpoint(folder); }),
             "names step-0000030, which is not a committed checkpoint (it does not exist)");
  EXPECT_HAS(error_of([&] { find_checkpoint(folder); }),
             "set checkpoint.load_step to a committed step (10)");
  write_file_atomic(folder + "/latest", "step-0000010\n");
  EXPECT_EQ(*find_checkpoint(folder), folder + "/step-0000010");
}

TEST(FindCheckpoint, AStepDirectoryWithoutMetadataIsNeverSkippedSilently) {
  TempDir dir;
  const std::string folder = dir / "ck";
  touch(fs::path(folder) / "step-0000010" / "metadata.json", "{}");
  touch(fs::path(folder) / "step-0000020" / "rank-00000.safetensors");
  EXPECT_EQ(uncommitted_step_dirs(folder), std::vector<std::string>{"step-0000020"});
  EXPECT_HAS(error_of([&] { find_checkpoint(folder); }),
             "holds step-0000020, a step directory without metadata.json: not a committed "
             "checkpoint");
  // Not with an explicit step either: the run would write over it later.
  EXPECT_HAS(error_of([&] { find_checkpoint(folder, 10); }), "holds step-0000020");
  // A purge cut short leaves a `.purging` directory, which is no step directory; an absurd
  // step number is none either.
  fs::rename(fs::path(folder) / "step-0000020", fs::path(folder) / "step-0000020.purging");
  EXPECT_EQ(*find_checkpoint(folder), folder + "/step-0000010");
  EXPECT_EQ(purge_checkpoints(folder, 0, 30), std::vector<std::string>{"step-0000020.purging"});
  fs::create_directories(fs::path(folder) / "step-99999999999999999999");
  EXPECT_EQ(*find_checkpoint(folder), folder + "/step-0000010");
  EXPECT_EQ(step_of_dir_name("step-0000010"), 10);
  EXPECT_EQ(step_of_dir_name("step--000006"), -1);
  EXPECT_EQ(step_of_dir_name("step-99999999999999999999"), -1);
}

}  // namespace
}  // namespace strata
