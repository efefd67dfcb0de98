// Resume planning and weight-source selection: the pure decisions, on directories that hold
// just the marker files each kind is recognised by (no tensors are loaded).
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <functional>
#include <fstream>
#include <map>
#include <string>

#include "checkpoint/errors.h"
#include "tests/common/temp_dir.h"
#include "trainer/resume.h"
#include "trainer/train_state.h"
#include "trainer/weight_sources.h"

namespace strata {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

#define EXPECT_HAS(text, part) EXPECT_NE(std::string(text).find(part), std::string::npos) << (text)

void write(const fs::path& path, const std::string& text) {
  fs::create_directories(path.parent_path());
  std::ofstream(path) << text;
}

// A committed Strata step directory (what find_checkpoint recognises) without tensors, its
// valid metadata.json extended by `extra`.
std::string strata_step(const fs::path& folder, int64_t step,
                        const nlohmann::json& extra = nlohmann::json::object()) {
  const fs::path dir = folder / fmt::format("step-{:07d}", step);
  nlohmann::json metadata = {{"format", "strata-checkpoint"},
                             {"format_version", 1},
                             {"step", step},
                             {"world_size", 1},
                             {"files", nlohmann::json::object()},
                             {"tensors", nlohmann::json::object()}};
  metadata.update(extra);
  write(dir / "metadata.json", metadata.dump());
  write(folder / "latest", dir.filename().string() + "\n");
  return dir.string();
}

std::string hf_dir(const fs::path& dir) {
  write(dir / "config.json", "{\"model_type\": \"llama\"}");
  write(dir / "model.safetensors", "weights");
  return dir.string();
}

std::string peft_dir(const fs::path& dir, const std::string& base) {
  write(dir / "adapter_config.json",
        fmt::format("{{\"peft_type\": \"LORA\", \"base_model_name_or_path\": {}}}",
                    base.empty() ? "null" : "\"" + base + "\""));
  write(dir / "adapter_model.safetensors", "factors");
  return dir.string();
}

const LocalDir kSame = [](const std::string& path) { return path; };

std::string error_of(const std::function<void()>& body) {
  try {
    body();
  } catch (const CheckpointError& e) {
    return e.what();
  }
  return "no error";
}

TEST(WeightSources, ClassifiesByTheFilesADirectoryHolds) {
  TempDir tmp;
  EXPECT_EQ(classify_source("x", hf_dir(tmp.path() / "hf"), std::nullopt, "r").kind,
            WeightSource::Kind::kHf);
  EXPECT_EQ(classify_source("x", peft_dir(tmp.path() / "peft", "b"), std::nullopt, "r").kind,
            WeightSource::Kind::kPeft);
  const std::string step = strata_step(tmp.path() / "ck", 7);
  const WeightSource s = classify_source("x", (tmp.path() / "ck").string(), std::nullopt, "r");
  EXPECT_EQ(s.kind, WeightSource::Kind::kStrata);
  EXPECT_EQ(s.dir, step);  // the folder's latest step directory
  // An export with its adapter beside the base model is both: the adapter wins.
  peft_dir(tmp.path() / "hf", "b");
  EXPECT_EQ(classify_source("x", (tmp.path() / "hf").string(), std::nullopt, "r").kind,
            WeightSource::Kind::kPeft);
  fs::create_directories(tmp.path() / "empty");
  EXPECT_HAS(error_of([&] {
               classify_source("given", tmp / "empty", std::nullopt, "checkpoint.resume_path");
             }),
             "checkpoint.resume_path given (" + (tmp / "empty") +
                 ") holds no committed Strata checkpoint");
}

TEST(WeightSources, APeftAdapterExpandsToItsBaseThenItself) {
  TempDir tmp;
  const std::string base = hf_dir(tmp.path() / "base");
  const std::string adapter = peft_dir(tmp.path() / "adapter", base);
  const std::vector<WeightSource> sources = expand_source(adapter, kSame, std::nullopt, "--from");
  ASSERT_EQ(sources.size(), 2u);
  EXPECT_EQ(sources[0].dir, base);
  EXPECT_EQ(sources[0].kind, WeightSource::Kind::kHf);
  EXPECT_EQ(sources[1].dir, adapter);
  EXPECT_EQ(sources[1].kind, WeightSource::Kind::kPeft);
  // A base that is itself an export with an adapter beside it is loaded as the HF model.
  peft_dir(tmp.path() / "base", "elsewhere");
  EXPECT_EQ(expand_source(adapter, kSame, std::nullopt, "--from")[0].kind, WeightSource::Kind::kHf);
  const std::string orphan = peft_dir(tmp.path() / "orphan", "");
  EXPECT_HAS(error_of([&] { expand_source(orphan, kSame, std::nullopt, "--from"); }),
             "names no base_model_name_or_path");
}

TEST(WeightSources, AnAdapterOnlyCheckpointBringsItsVerifiedBases) {
  TempDir tmp;
  const std::string base = hf_dir(tmp.path() / "base");
  const nlohmann::json record = {
      {"adapter_only",
       {{"bases", {{{"source", base}, {"fingerprint", source_fingerprint(base)}}}}}}};
  const std::string step = strata_step(tmp.path() / "ck", 3, record);
  const std::vector<WeightSource> sources =
      expand_source(tmp / "ck", kSame, std::nullopt, "--from");
  ASSERT_EQ(sources.size(), 2u);
  EXPECT_EQ(sources[0].dir, step);
  EXPECT_EQ(sources[1].dir, base);
  write(fs::path(base) / "model.safetensors", "other weights");
  EXPECT_HAS(error_of([&] { expand_source(tmp / "ck", kSame, std::nullopt, "--from"); }),
             "the base model changed");
}

TEST(ResumePlan, FromScratchWithoutCheckpointsOrResumePath) {
  TempDir tmp;
  const ResumePlan plan = plan_resume(CheckpointConfig(), tmp.path() / "checkpoints", kSame);
  EXPECT_TRUE(plan.dir.empty());
  EXPECT_TRUE(plan.extra.empty());
  EXPECT_HAS(plan.reason, "no committed checkpoint in");
}

TEST(ResumePlan, TheRunsOwnCheckpointWinsOverResumePath) {
  TempDir tmp;
  const std::string own = strata_step(tmp.path() / "checkpoints", 20);
  strata_step(tmp.path() / "checkpoints", 10);  // latest now names step 10
  CheckpointConfig k;
  k.resume_path = hf_dir(tmp.path() / "hf");
  ResumePlan plan = plan_resume(k, tmp.path() / "checkpoints", kSame);
  EXPECT_TRUE(plan.own);
  EXPECT_FALSE(plan.weights_only);
  EXPECT_HAS(plan.dir, "step-0000010");
  EXPECT_HAS(plan.reason, "(latest)");
  k.load_step = 20;
  plan = plan_resume(k, tmp.path() / "checkpoints", kSame);
  EXPECT_EQ(plan.dir, own);
  EXPECT_HAS(plan.reason, "checkpoint.load_step");
  k.load_step = 30;
  EXPECT_HAS(error_of([&] { plan_resume(k, tmp.path() / "checkpoints", kSame); }),
             "has no committed checkpoint for step 30 (committed steps: 10, 20)");
  // checkpoint.enable false: the folder is not the run's state.
  k.load_step.reset();
  k.enable = false;
  plan = plan_resume(k, tmp.path() / "checkpoints", kSame);
  EXPECT_FALSE(plan.own);
  EXPECT_TRUE(plan.hf);
}

TEST(ResumePlan, ResumePathKinds) {
  TempDir tmp;
  CheckpointConfig k;
  const fs::path folder = tmp.path() / "run" / "checkpoints";
  // An HF model: weights only; a Hub spec is named in the reason, its snapshot is the dir.
  const std::string hf = hf_dir(tmp.path() / "hf");
  k.resume_path = "hf://owner/repo";
  ResumePlan plan =
      plan_resume(k, folder, [&](const std::string& p) { return p == "hf://owner/repo" ? hf : p; });
  EXPECT_TRUE(plan.hf && plan.weights_only && !plan.own);
  EXPECT_EQ(plan.dir, hf);
  EXPECT_EQ(plan.given, "hf://owner/repo");
  EXPECT_EQ(plan.reason,
            "checkpoint.resume_path hf://owner/repo is a Hugging Face model directory");
  // A Strata checkpoint: its full state, or the weights alone with resume_model_only.
  const std::string other = strata_step(tmp.path() / "other", 5);
  k.resume_path = (tmp.path() / "other").string();
  plan = plan_resume(k, folder, kSame);
  EXPECT_FALSE(plan.weights_only || plan.hf || plan.own);
  EXPECT_EQ(plan.dir, other);
  k.resume_model_only = true;
  plan = plan_resume(k, folder, kSame);
  EXPECT_TRUE(plan.weights_only);
  EXPECT_HAS(plan.reason, "with resume_model_only");
  // A PEFT adapter: its base is the primary source, the adapter comes first among the extras,
  // before additional_load_paths.
  k.resume_model_only = false;
  k.resume_path = peft_dir(tmp.path() / "adapter", hf);
  k.additional_load_paths = {other};
  plan = plan_resume(k, folder, kSame);
  EXPECT_TRUE(plan.hf && plan.weights_only);
  EXPECT_EQ(plan.dir, hf);
  ASSERT_EQ(plan.extra.size(), 2u);
  EXPECT_EQ(plan.extra[0].kind, WeightSource::Kind::kPeft);
  EXPECT_EQ(plan.extra[1].dir, other);
  EXPECT_HAS(plan.reason, "is a PEFT adapter on base " + hf);
}

TEST(ResumePlan, AdditionalLoadPathsAlone) {
  TempDir tmp;
  CheckpointConfig k;
  const std::string hf = hf_dir(tmp.path() / "hf");
  const std::string adapter = peft_dir(tmp.path() / "adapter", hf);
  k.additional_load_paths = {hf, adapter};
  ResumePlan plan = plan_resume(k, tmp.path() / "checkpoints", kSame);
  EXPECT_EQ(plan.dir, hf);  // the first is the primary source, weights only
  EXPECT_TRUE(plan.weights_only);
  ASSERT_EQ(plan.extra.size(), 1u);
  EXPECT_EQ(plan.extra[0].dir, adapter);
  // An adapter first has no base to be the primary: everything stays an extra source.
  k.additional_load_paths = {adapter};
  plan = plan_resume(k, tmp.path() / "checkpoints", kSame);
  EXPECT_TRUE(plan.dir.empty());
  EXPECT_EQ(plan.extra.size(), 1u);
  k.additional_load_paths = {(tmp.path() / "nothing").string()};
  EXPECT_HAS(error_of([&] { plan_resume(k, tmp.path() / "checkpoints", kSame); }),
             "does not exist");
}

TEST(ResumePlan, TravelsAsJsonAndMovesToEachRanksDirectories) {
  ResumePlan plan;
  plan.dir = "/cache0/snap/sub";
  plan.given = "hf://o/r";
  plan.reason = "why";
  plan.hf = plan.weights_only = true;
  plan.extra = {{"hf://o/a", "/cache0/adapter", WeightSource::Kind::kPeft},
                {"local", "/x", WeightSource::Kind::kStrata}};
  ResumePlan back = ResumePlan::from_json(plan.to_json());
  EXPECT_EQ(back.to_json(), plan.to_json());
  back.relocate({{"hf://o/r", "/cache0/snap"}, {"hf://o/a", "/cache0/adapter"}},
                {{"hf://o/r", "/cache1/snap"}, {"hf://o/a", "/cache1/adapter"}});
  EXPECT_EQ(back.dir, "/cache1/snap/sub");
  EXPECT_EQ(back.extra[0].dir, "/cache1/adapter");
  EXPECT_EQ(back.extra[1].dir, "/x");
}

// train_state.json is checked against its schema and the checkpoint's step: every field
// present, of its type and in range, the counts consistent.
TEST(TrainStateFile, DamagedFieldsAreRefusedWithTheFieldNamed) {
  TrainState state = TrainState::fresh(7);
  state.step = 10;
  state.data_step_offset = 4;
  const nlohmann::json good = state.to_json({2, 10, 12, 8});
  const TrainState::Saved saved = TrainState::validate(good, "t.json", 10);
  EXPECT_EQ(saved.data_step, 6);
  EXPECT_EQ(saved.data_seed, 7u);
  EXPECT_EQ(saved.optimizer_steps, 10);
  EXPECT_EQ(saved.lr_step, 10);
  auto error_with = [&](const std::function<void(nlohmann::json&)>& damage, int64_t step = 10) {
    nlohmann::json j = good;
    damage(j);
    try {
      TrainState::validate(j, "ck/train_state.json", step);
    } catch (const CheckpointError& e) {
      return std::string(e.what());
    }
    ADD_FAILURE() << "accepted: " << j.dump();
    return std::string();
  };
  EXPECT_HAS(
      error_with([](nlohmann::json&) {}, 11),
      "ck/train_state.json is damaged: step = 10 but the checkpoint's metadata.json says 11");
  EXPECT_HAS(error_with([](nlohmann::json& j) { j["dataloader"]["samples_consumed"] = -8; }),
             "dataloader.samples_consumed = -8 is outside [0, ");
  EXPECT_HAS(error_with([](nlohmann::json& j) { j["dataloader"]["samples_consumed"] = 40; }),
             "dataloader.samples_consumed = 40 but step 6 x global_batch_size 8");
  EXPECT_HAS(error_with([](nlohmann::json& j) { j["dataloader"]["step"] = 11; }),
             "dataloader.step = 11 is outside [0, 10]");
  EXPECT_HAS(error_with([](nlohmann::json& j) { j["lr_scheduler"]["step"] = -1; }),
             "lr_scheduler.step = -1 is outside [0, 10]");
  EXPECT_HAS(error_with([](nlohmann::json& j) { j["optimizer"]["steps_taken"] = "many"; }),
             "optimizer.steps_taken is not an integer");
  EXPECT_HAS(error_with([](nlohmann::json& j) { j["dataloader"]["seed"] = -3; }),
             "dataloader.seed is not a non-negative integer");
  EXPECT_HAS(error_with([](nlohmann::json& j) { j.erase("rng"); }), "the document has no \"rng\"");
  EXPECT_HAS(error_with([](nlohmann::json& j) { j["world_size"] = 0; }),
             "world_size = 0 is outside [1, ");
  EXPECT_HAS(error_with([](nlohmann::json& j) { j = nlohmann::json::array(); }),
             "the document is not an object");
  EXPECT_HAS(error_with([](nlohmann::json&) {}, 11), "HINT: resume from another step");
  // A converted model's state from before world_size, lr_scheduler and the sample counts were
  // written: accepted for a model-only checkpoint, where they are optional.
  const nlohmann::json older = {{"step", 10},
                                {"optimizer", {{"name", "adamw"}, {"steps_taken", 0}}},
                                {"dataloader", {{"seed", 0}, {"step", 0}}},
                                {"rng", {{"sample_seed", 0}}}};
  EXPECT_EQ(TrainState::validate(older, "t.json", 10, /*model_only=*/true).data_step, 0);
  EXPECT_THROW(TrainState::validate(older, "t.json", 10), CheckpointError);
}

TEST(TrainStateFile, MissingAndInvalidFilesNameThePath) {
  TempDir dir;
  auto error_of = [&](const std::string& step_dir) {
    try {
      TrainState::read(step_dir, 0);
    } catch (const CheckpointError& e) {
      return std::string(e.what());
    }
    ADD_FAILURE();
    return std::string();
  };
  EXPECT_HAS(error_of(dir.path().string()), "/train_state.json is damaged: the file is missing");
  std::ofstream(dir.path() / "train_state.json") << "{\"step\": 0,";
  EXPECT_HAS(error_of(dir.path().string()), "/train_state.json is not valid JSON: parse error");
}

}  // namespace
}  // namespace strata
