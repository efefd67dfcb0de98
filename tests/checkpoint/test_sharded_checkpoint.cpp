// The sharded checkpoint format without MPI: N writers are simulated by writing one rank file
// per partition of the flat tensors, then read back under every other partition M. Plus
// corruption, truncation, missing files, bad metadata and model mismatches, each with a
// message that names the file or key; checkpoint discovery and retention.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/checkpoint_manager.h"
#include "checkpoint/file_io.h"
#include "checkpoint/sharded_checkpoint.h"
#include "tests/common/temp_dir.h"

namespace strata {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

std::vector<std::pair<std::string, at::Tensor>> sample_tensors() {
  at::manual_seed(3);
  return {{"layers.0.attention.wq.weight", at::randn({7, 5})},
          {"norm.weight", at::randn({13})},
          {"optimizer.norm.weight.exp_avg", at::randn({3, 4, 2})},
          {"tiny", at::randn({1})}};
}

// Rank r of n holds elements [r*ceil(k/n), ...) of every tensor (possibly none).
std::vector<TensorPiece> partition(const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                                   int rank, int n) {
  std::vector<TensorPiece> out;
  for (const auto& [key, t] : tensors) {
    const int64_t k = t.numel(), chunk = (k + n - 1) / n;
    const int64_t begin = std::min(k, rank * chunk), end = std::min(k, begin + chunk);
    out.push_back({key, t.sizes().vec(), begin, t.reshape({-1}).narrow(0, begin, end - begin)});
  }
  return out;
}

// What the CheckpointManager does across n ranks, in one process.
void save_simulated(const std::string& dir,
                    const std::vector<std::pair<std::string, at::Tensor>>& tensors, int n,
                    int64_t step = 5) {
  fs::create_directories(dir);
  std::vector<nlohmann::json> reports;
  for (int r = 0; r < n; ++r) reports.push_back(write_rank_file(dir, r, partition(tensors, r, n)));
  const nlohmann::json meta = build_metadata(reports, partition(tensors, 0, n), {{"step", step}});
  write_file_atomic((fs::path(dir) / "metadata.json").string(), meta.dump(1));
}

// Empty tensors of the same shapes, partitioned for m readers.
std::vector<TensorPiece> empty_pieces(
    const std::vector<std::pair<std::string, at::Tensor>>& tensors, int rank, int m,
    at::ScalarType dtype = at::kFloat) {
  std::vector<std::pair<std::string, at::Tensor>> zeros;
  for (const auto& [key, t] : tensors) zeros.emplace_back(key, at::full(t.sizes(), -1.0, dtype));
  return partition(zeros, rank, m);
}

std::string load_error(const std::string& dir, std::vector<TensorPiece> pieces) {
  try {
    CheckpointReader(dir).load(pieces);
  } catch (const CheckpointError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected CheckpointError";
  return "";
}

void flip_byte(const std::string& path, uint64_t offset) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(offset));
  char c = 0;
  f.get(c);
  f.seekp(static_cast<std::streamoff>(offset));
  f.put(static_cast<char>(c ^ 0x10));
}

#define EXPECT_HAS(text, part) EXPECT_NE(std::string(text).find(part), std::string::npos) << (text)

TEST(ShardedCheckpoint, EveryWriterCountLoadsUnderEveryReaderCount) {
  TempDir dir;
  const auto tensors = sample_tensors();
  for (int n = 1; n <= 4; ++n) {
    const std::string ck = dir / ("n" + std::to_string(n));
    save_simulated(ck, tensors, n);
    const CheckpointReader reader(ck);
    EXPECT_EQ(reader.metadata().at("world_size"), n);
    EXPECT_EQ(reader.step(), 5);
    for (int m = 1; m <= 4; ++m) {
      for (int r = 0; r < m; ++r) {
        std::vector<TensorPiece> pieces = empty_pieces(tensors, r, m);
        reader.load(pieces);
        for (size_t i = 0; i < pieces.size(); ++i) {
          const at::Tensor expected =
              tensors[i].second.reshape({-1}).narrow(0, pieces[i].begin, pieces[i].local.numel());
          EXPECT_TRUE(at::equal(pieces[i].local, expected))
              << tensors[i].first << " n=" << n << " m=" << m;
        }
      }
    }
    EXPECT_TRUE(reader.verify_files().empty());
  }
}

TEST(ShardedCheckpoint, MetadataDescribesEveryChunkAndFile) {
  TempDir dir;
  save_simulated(dir / "ck", sample_tensors(), 3);
  const CheckpointReader reader(dir / "ck");
  const auto& meta = reader.metadata();
  EXPECT_EQ(meta.at("format"), "strata-checkpoint");
  EXPECT_EQ(meta.at("format_version"), kCheckpointFormatVersion);
  EXPECT_EQ(meta.at("files").size(), 3u);
  const auto& wq = meta.at("tensors").at("layers.0.attention.wq.weight");
  EXPECT_EQ(wq.at("dtype"), "F32");
  EXPECT_EQ(wq.at("shape"), (std::vector<int64_t>{7, 5}));
  ASSERT_EQ(wq.at("chunks").size(), 3u);  // 35 elements: 12 + 12 + 11
  EXPECT_EQ(wq.at("chunks")[1].at("file"), rank_file_name(1));
  EXPECT_EQ(wq.at("chunks")[1].at("begin"), 12);
  EXPECT_EQ(wq.at("chunks")[1].at("end"), 24);
  // "tiny" has one element: only rank 0 holds it.
  EXPECT_EQ(meta.at("tensors").at("tiny").at("chunks").size(), 1u);
  const auto& file = meta.at("files").at(rank_file_name(0));
  EXPECT_EQ(file.at("size"), fs::file_size(dir / ("ck/" + rank_file_name(0))));
  EXPECT_EQ(file.at("sha256"), digest_file(dir / ("ck/" + rank_file_name(0))).sha256);
  EXPECT_EQ(describe_checkpoint(reader).find("checkpoint " + (dir / "ck")), 0u);
}

TEST(ShardedCheckpoint, StoredDtypeIsCastToThePieceDtype) {
  TempDir dir;
  auto tensors = sample_tensors();
  for (auto& [key, t] : tensors) t = t.to(at::kBFloat16);
  save_simulated(dir / "ck", tensors, 2);
  std::vector<TensorPiece> pieces = empty_pieces(tensors, 0, 1, at::kFloat);
  CheckpointReader(dir / "ck").load(pieces);
  for (size_t i = 0; i < pieces.size(); ++i) {
    EXPECT_TRUE(at::equal(pieces[i].local, tensors[i].second.to(at::kFloat).reshape({-1})));
  }
}

TEST(ShardedCheckpoint, FlippedByteIsDetectedAndTheFileNamed) {
  TempDir dir;
  const auto tensors = sample_tensors();
  save_simulated(dir / "ck", tensors, 2);
  const std::string file = dir / ("ck/" + rank_file_name(1));
  flip_byte(file, fs::file_size(file) - 3);  // in the data section
  const std::string e = load_error(dir / "ck", empty_pieces(tensors, 0, 1));
  EXPECT_HAS(e, file);
  EXPECT_HAS(e, "is corrupted");
  EXPECT_HAS(e, "HINT:");
  const auto problems = CheckpointReader(dir / "ck").verify_files();
  ASSERT_EQ(problems.size(), 1u);
  EXPECT_HAS(problems[0], file);
  EXPECT_HAS(problems[0], "SHA-256");
  // A reader whose ranges avoid rank 1's file does not need it.
  std::vector<TensorPiece> first = empty_pieces(tensors, 0, 2);
  EXPECT_NO_THROW(CheckpointReader(dir / "ck").load(first));
}

TEST(ShardedCheckpoint, FlippedHeaderByteIsDetected) {
  TempDir dir;
  const auto tensors = sample_tensors();
  save_simulated(dir / "ck", tensors, 1);
  const std::string file = dir / ("ck/" + rank_file_name(0));
  flip_byte(file, 9);  // inside the JSON header: still valid JSON or not, it must not load
  const std::string e = load_error(dir / "ck", empty_pieces(tensors, 0, 1));
  EXPECT_HAS(e, file);
}

TEST(ShardedCheckpoint, TruncatedAndMissingFilesAreNamed) {
  TempDir dir;
  const auto tensors = sample_tensors();
  save_simulated(dir / "ck", tensors, 2);
  const std::string file0 = dir / ("ck/" + rank_file_name(0));
  fs::resize_file(file0, fs::file_size(file0) - 8);
  std::string e = load_error(dir / "ck", empty_pieces(tensors, 0, 1));
  EXPECT_HAS(e, file0);
  EXPECT_HAS(e, "truncated");
  fs::remove(file0);
  e = load_error(dir / "ck", empty_pieces(tensors, 0, 1));
  EXPECT_HAS(e, file0 + " is missing");
  const auto problems = CheckpointReader(dir / "ck").verify_files();
  ASSERT_EQ(problems.size(), 1u);
  EXPECT_HAS(problems[0], rank_file_name(0));
}

TEST(ShardedCheckpoint, BadMetadataIsRejectedWithTheReason) {
  TempDir dir;
  const auto tensors = sample_tensors();
  const std::string ck = dir / "ck";
  save_simulated(ck, tensors, 2);
  const std::string meta_path = ck + "/metadata.json";
  std::ifstream in(meta_path);
  const nlohmann::json good = nlohmann::json::parse(in);
  auto error_with = [&](const std::string& text) {
    write_file_atomic(meta_path, text);
    try {
      CheckpointReader reader(ck);
    } catch (const CheckpointError& e) {
      return std::string(e.what());
    }
    ADD_FAILURE() << "accepted: " << text;
    return std::string();
  };
  EXPECT_HAS(error_with("{not json"), "invalid JSON");
  EXPECT_HAS(error_with("{not json"), meta_path);
  nlohmann::json bad = good;
  bad["format_version"] = 99;
  EXPECT_HAS(error_with(bad.dump()), "format version 99 is not supported");
  bad = good;
  bad["tensors"]["norm.weight"]["chunks"][0]["end"] = 5;
  EXPECT_HAS(error_with(bad.dump()), "the chunks of tensor 'norm.weight' do not tile it");
  bad = good;
  bad["tensors"]["norm.weight"]["chunks"].erase(1);
  EXPECT_HAS(error_with(bad.dump()), "cover 7 of its 13 elements");
  bad = good;
  bad["tensors"]["tiny"]["chunks"][0]["file"] = "rank-00009.safetensors";
  EXPECT_HAS(error_with(bad.dump()), "not listed under \"files\"");
  bad = good;
  bad["tensors"]["tiny"]["dtype"] = "F99";
  EXPECT_HAS(error_with(bad.dump()), "F99");
  bad = good;
  bad.erase("step");
  EXPECT_HAS(error_with(bad.dump()), "step");
  fs::remove(meta_path);
  EXPECT_HAS(error_with(""), "");  // an empty file is not JSON either
  fs::remove(meta_path);
  try {
    CheckpointReader reader(ck);
    FAIL();
  } catch (const CheckpointError& e) {
    EXPECT_HAS(e.what(), "no readable metadata.json");
  }
}

TEST(ShardedCheckpoint, ModelMismatchListsEveryKeyWithBothShapes) {
  TempDir dir;
  const auto tensors = sample_tensors();
  save_simulated(dir / "ck", tensors, 1);
  auto other = tensors;
  other[0].second = at::zeros({5, 7});
  other[1].first = "norm.bias";
  const std::string e = load_error(dir / "ck", empty_pieces(other, 0, 1));
  EXPECT_HAS(e, "does not fit the model");
  EXPECT_HAS(
      e,
      "'layers.0.attention.wq.weight' has shape [7, 5] in the checkpoint but [5, 7] in the model");
  EXPECT_HAS(e, "'norm.bias' is missing (model expects shape [13])");
}

TEST(FindCheckpoint, LatestThenNewestCommittedThenExplicitStep) {
  TempDir dir;
  const auto tensors = sample_tensors();
  const std::string folder = dir / "ck";
  EXPECT_THROW(find_checkpoint(folder), CheckpointError);  // does not exist
  fs::create_directories(folder);
  EXPECT_FALSE(find_checkpoint(folder).has_value());
  save_simulated(folder + "/" + step_dir_name(10), tensors, 1, 10);
  save_simulated(folder + "/" + step_dir_name(20), tensors, 1, 20);
  fs::create_directories(folder + "/" + step_dir_name(30) + ".incomplete");
  EXPECT_EQ(*find_checkpoint(folder), folder + "/step-0000020");  // no `latest`: newest
  write_file_atomic(folder + "/latest", "step-0000010\n");
  EXPECT_EQ(*find_checkpoint(folder), folder + "/step-0000010");
  EXPECT_EQ(*find_checkpoint(folder, 20), folder + "/step-0000020");
  EXPECT_EQ(*find_checkpoint(folder + "/step-0000020"), folder + "/step-0000020");
  try {
    find_checkpoint(folder, 30);
    FAIL();
  } catch (const CheckpointError& e) {
    EXPECT_HAS(e.what(), "no committed checkpoint for step 30 (committed steps: 10, 20)");
  }
}

TEST(PurgeCheckpoints, KeepsTheNewestKAndLatestAndDropsIncompleteDirs) {
  TempDir dir;
  const auto tensors = sample_tensors();
  const std::string folder = dir / "ck";
  for (int step : {1, 2, 3, 4, 5})
    save_simulated(folder + "/" + step_dir_name(step), tensors, 1, step);
  fs::create_directories(folder + "/step-0000006.incomplete");
  fs::create_directories(folder + "/step-0000007.incomplete");
  write_file_atomic(folder + "/latest", "step-0000001\n");
  const auto removed = purge_checkpoints(folder, 2, /*stale_below=*/7);
  EXPECT_EQ(removed.size(), 3u);                      // steps 2 and 3, and step 6's incomplete dir
  EXPECT_TRUE(fs::exists(folder + "/step-0000001"));  // named by latest
  EXPECT_FALSE(fs::exists(folder + "/step-0000002"));
  EXPECT_FALSE(fs::exists(folder + "/step-0000003"));
  EXPECT_TRUE(fs::exists(folder + "/step-0000004"));
  EXPECT_TRUE(fs::exists(folder + "/step-0000005"));
  EXPECT_FALSE(fs::exists(folder + "/step-0000006.incomplete"));
  EXPECT_TRUE(fs::exists(folder + "/step-0000007.incomplete"));
  EXPECT_EQ(purge_checkpoints(folder, 0, 8).size(), 1u);  // keep all: only the incomplete dir
}

// One rank, in process: the collectives of a world of one.
class SoloCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  void all_reduce(at::Tensor&, ReduceOp) override {}
  void all_gather(const at::Tensor& in, at::Tensor& out) override { out.copy_(in); }
  void reduce_scatter(const at::Tensor& in, at::Tensor& out, ReduceOp) override { out.copy_(in); }
  void broadcast(at::Tensor&, int) override {}
  void barrier() override {}
  std::optional<RankFailure> agree(bool ok, const std::string& message) override {
    if (ok) return std::nullopt;
    return RankFailure{0, message};
  }
  std::vector<std::string> all_gather_strings(const std::string& text) override { return {text}; }
  std::string broadcast_string(const std::string& text, int) override { return text; }
  std::unique_ptr<Communicator> split(int, int) override {
    return std::make_unique<SoloCommunicator>();
  }
  CommStats stats() const override { return {}; }
};

// Saves `tensors` at step 1 with a CheckpointManager (async or not) on `device`, changes
// them in place as the optimizer would once wait_until_staged returned, and returns what was
// saved, loaded back on the CPU.
std::vector<at::Tensor> save_then_modify(
    const std::string& folder, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
    bool async, const at::Device& device) {
  SoloCommunicator comm;
  CheckpointOptions options;
  options.folder = folder;
  options.async = async;
  CheckpointManager manager(options, comm, [](const std::string&) {});
  std::vector<at::Tensor> live;
  SaveRequest request;
  request.step = 1;
  for (const auto& [key, t] : tensors) {
    live.push_back(t.to(device).reshape({-1}).clone());
    request.pieces.push_back({key, t.sizes().vec(), 0, live.back()});
  }
  if (async) manager.reserve_staging(request.pieces);
  manager.save(std::move(request));
  manager.wait_until_staged();
  for (at::Tensor& t : live) t.add_(100.0);  // the optimizer step
  manager.finish();
  const std::optional<std::string> dir = find_checkpoint(folder);
  EXPECT_TRUE(dir.has_value());
  std::vector<TensorPiece> pieces = empty_pieces(tensors, 0, 1);
  CheckpointReader(*dir).load(pieces);
  std::vector<at::Tensor> out;
  for (const TensorPiece& piece : pieces) out.push_back(piece.local);
  return out;
}

void expect_saved(const std::vector<at::Tensor>& saved,
                  const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  ASSERT_EQ(saved.size(), tensors.size());
  for (size_t i = 0; i < saved.size(); ++i) {
    EXPECT_TRUE(at::equal(saved[i], tensors[i].second.reshape({-1}))) << tensors[i].first;
  }
}

TEST(CheckpointManager, SavesTheValuesOfTheSaveCallSyncAndAsync) {
  TempDir dir;
  const auto tensors = sample_tensors();
  expect_saved(save_then_modify(dir / "sync", tensors, false, at::kCPU), tensors);
  expect_saved(save_then_modify(dir / "async", tensors, true, at::kCPU), tensors);
}

TEST(CheckpointManager, StagesAStridedCpuPiece) {
  TempDir dir;
  const at::Tensor full = at::arange(20, at::kFloat);
  SoloCommunicator comm;
  CheckpointOptions options;
  options.folder = dir / "ck";
  options.async = true;
  CheckpointManager manager(options, comm, [](const std::string&) {});
  SaveRequest request;
  request.step = 2;
  request.pieces.push_back({"odd", {10}, 0, full.slice(0, 1, 20, 2)});  // strided
  manager.save(std::move(request));
  manager.finish();
  std::vector<TensorPiece> pieces{{"odd", {10}, 0, at::zeros({10})}};
  CheckpointReader(*find_checkpoint(options.folder)).load(pieces);
  EXPECT_TRUE(at::equal(pieces[0].local, full.slice(0, 1, 20, 2)));
}

// A GPU: pieces on CUDA staged through pinned memory on a side stream (async), or copied to
// the host (sync); written by write_rank_file from the device; loaded into CUDA pieces.
TEST(CheckpointManager, SavesCudaPiecesSyncAndAsync) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  TempDir dir;
  const auto tensors = sample_tensors();
  const at::Device gpu(at::kCUDA, 0);
  expect_saved(save_then_modify(dir / "sync", tensors, false, gpu), tensors);
  expect_saved(save_then_modify(dir / "async", tensors, true, gpu), tensors);
  // The format's writer and reader, with pieces on the device.
  std::vector<std::pair<std::string, at::Tensor>> on_gpu;
  for (const auto& [key, t] : tensors) on_gpu.emplace_back(key, t.to(gpu));
  save_simulated(dir / "direct", on_gpu, 2);
  std::vector<TensorPiece> pieces = partition(on_gpu, 0, 1);
  for (TensorPiece& piece : pieces) piece.local = at::zeros_like(piece.local);
  CheckpointReader(dir / "direct").load(pieces);
  for (size_t i = 0; i < pieces.size(); ++i) {
    EXPECT_TRUE(pieces[i].local.is_cuda());
    EXPECT_TRUE(at::equal(pieces[i].local.cpu(), tensors[i].second.reshape({-1})));
  }
}

}  // namespace
}  // namespace strata
