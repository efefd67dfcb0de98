// Memory estimates: the parts scale as their formulas say, absurd configs are refused before
// anything is allocated with the keys that make them large, the override and unknown memory
// only report, arithmetic stays finite or infinite (never wraps), the machine's available
// memory is read from /proc/meminfo and cgroup limits, and config validation caps sizes.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>

#include "tests/common/micro_model.h"
#include "tests/common/temp_dir.h"
#include "trainer/config/config.h"
#include "trainer/errors.h"
#include "trainer/memory_estimate.h"
#include "trainer/model/llama.h"

namespace strata {
namespace {

#define EXPECT_HAS(haystack, needle)                               \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) \
      << "message: " << (haystack) << "\nexpected to contain: " << (needle)

constexpr long double kGiB = 1024.0L * 1024.0L * 1024.0L;

std::optional<AvailableMemory> gib(long double n) {
  return AvailableMemory{n * kGiB, "test"};
}

// The ConfigError message of the training check (fails the test when it passes).
std::string training_error(const Config& c, int world = 1, int per_node = 1,
                           long double available_gib = 64) {
  try {
    check_training_memory(c, world, per_node, gib(available_gib));
  } catch (const ConfigError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected the memory check to refuse the config";
  return "";
}

std::string inference_error(const ModelConfig& m, const InferenceWorkload& w,
                            const ModelKeyNames& names = {}, long double available_gib = 64) {
  try {
    check_inference_memory(m, {}, w, names, gib(available_gib));
  } catch (const ConfigError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected the memory check to refuse the model";
  return "";
}

TEST(MemoryEstimate, PartsFollowTheFormulas) {
  Config c;
  c.model = testing::micro_model(400, 32);
  c.data.seq_len = 32;
  c.training.micro_batch_size = 4;
  const long double P = static_cast<long double>(Llama::count_parameters(c.model));
  const MemoryEstimate one = estimate_training_memory(c, 1);
  EXPECT_EQ(one.parameters, 4 * P);
  EXPECT_EQ(one.gradients, 4 * P);
  EXPECT_EQ(one.optimizer, 8 * P);
  EXPECT_EQ(one.gathered, 0);
  EXPECT_EQ(one.staging, 0);
  EXPECT_EQ(one.rope, 16.0L * 32 * c.model.head_dim());
  // Activations are linear in the micro batch (every term holds one factor of b).
  c.training.micro_batch_size = 8;
  EXPECT_NEAR(static_cast<double>(estimate_training_memory(c, 1).activations),
              2 * static_cast<double>(one.activations), 1e-6);
  c.training.micro_batch_size = 4;
  // Parameters grow with the layers by one block each.
  c.model.n_layers = 4;
  const long double block = (Llama::count_parameters(c.model) - P) / 2;
  EXPECT_EQ(estimate_training_memory(c, 1).parameters, 4 * (P + 2 * block));
  c.model.n_layers = 2;

  // FSDP over 4 ranks: a quarter of the state, plus one gathered unit with its gradient.
  const MemoryEstimate fsdp = estimate_training_memory(c, 4);
  EXPECT_EQ(fsdp.parameters, P);
  EXPECT_EQ(fsdp.optimizer, 2 * P);
  const long double embedding = 400.0L * 32;
  EXPECT_EQ(fsdp.gathered, 8 * (embedding + 32));  // the head unit: output + final norm
  // Recomputing keeps less than keeping every unit's activations and parameters.
  c.parallel.fsdp.activation_checkpointing = "none";
  const MemoryEstimate keep = estimate_training_memory(c, 4);
  EXPECT_GT(keep.activations, fsdp.activations);
  EXPECT_EQ(keep.gathered, 4 * P + 4 * (embedding + 32));
  // Replicated data parallel: the whole state on every rank.
  c.parallel.fsdp.enabled = false;
  EXPECT_EQ(estimate_training_memory(c, 4).parameters, 4 * P);
  EXPECT_EQ(estimate_training_memory(c, 4).gathered, 0);
  // Async checkpoints stage this rank's share of parameters and moments.
  c.checkpoint.async_mode = "async";
  EXPECT_EQ(estimate_training_memory(c, 4).staging, 12 * P / 4);
}

TEST(MemoryEstimate, LoraTrainsOnlyItsFactors) {
  Config c;
  c.model = testing::micro_model(400, 32);
  ConverterConfig lora;
  lora.type = "lora";
  lora.rank = 4;
  lora.target_modules = {"wq", "wv"};
  c.converters = {lora};
  const MemoryEstimate e = estimate_training_memory(c, 1);
  // Per layer: wq (32 -> 32) and wv (32 -> 2 heads x 8) adapted with rank 4.
  const long double factors = 2 * 4 * ((32 + 32) + (32 + 16));
  EXPECT_EQ(e.gradients, 4 * factors);
  EXPECT_EQ(e.optimizer, 8 * factors);
  EXPECT_EQ(e.parameters, 4 * (Llama::count_parameters(c.model) + factors));
}

TEST(MemoryEstimate, InferenceHoldsTwoCopiesAndOneForwardPass) {
  const ModelConfig m = testing::micro_model(400, 64);
  const long double P = static_cast<long double>(Llama::count_parameters(m));
  InferenceWorkload convert;
  const MemoryEstimate e = estimate_inference_memory(m, {}, convert);
  EXPECT_EQ(e.parameters, 8 * P);
  EXPECT_EQ(e.activations, 0);
  EXPECT_EQ(e.gradients + e.optimizer, 0);
  InferenceWorkload eval;
  eval.batch = 8;
  const long double full = estimate_inference_memory(m, {}, eval).activations;
  eval.seq_len = 1000;  // longer than the model: its max_seq_len
  EXPECT_EQ(estimate_inference_memory(m, {}, eval).activations, full);
  eval.seq_len = 32;
  EXPECT_LT(estimate_inference_memory(m, {}, eval).activations, full / 2);
}

TEST(MemoryEstimate, AbsurdConfigsAreRefusedNamingTheirKeys) {
  Config base;
  base.model = testing::micro_model(400, 32);
  base.data.seq_len = 32;
  EXPECT_HAS(check_training_memory(base, 1, 1, gib(64)), "memory: estimate");

  Config c = base;
  c.model.n_layers = 100000000;
  std::string message = training_error(c);
  EXPECT_HAS(message, "the run does not fit in memory");
  EXPECT_HAS(message, "model.n_layers=100000000");
  EXPECT_HAS(message, "64.00 GiB available per rank");
  EXPECT_HAS(message, "HINT: make model.n_layers smaller");
  EXPECT_HAS(message, "--set parallel.skip_memory_check=true");
  EXPECT_EQ(message.find("model.dim="), std::string::npos) << message;

  c = base;
  c.model.dim = 1000000000;
  EXPECT_HAS(training_error(c), "model.dim=1000000000");
  c = base;
  c.model.vocab_size = 1000000000000;
  message = training_error(c);
  EXPECT_HAS(message, "model.vocab_size=1000000000000");
  EXPECT_EQ(message.find("model.n_layers="), std::string::npos) << message;
  c = base;
  c.model.max_seq_len = 1000000000000;
  EXPECT_HAS(training_error(c), "model.max_seq_len=1000000000000");
  c = base;
  c.training.micro_batch_size = 1 << 30;
  EXPECT_HAS(training_error(c), "training.micro_batch_size=1073741824");

  // The share of a node's memory: 8 ranks on 16 GiB have 2 GiB each.
  c = base;
  c.model.n_layers = 10000;  // about 4 GiB with one rank, a tenth of that with FSDP over 8
  c.training.micro_batch_size = 1;
  EXPECT_HAS(check_training_memory(c, 1, 1, gib(16)), "margin");
  EXPECT_HAS(training_error(c, 1, 8, 16),
             "2.00 GiB available per rank (test, 8 ranks on this node)");
  // ... which FSDP over 8 ranks spreads.
  EXPECT_HAS(check_training_memory(c, 8, 8, gib(16)), "margin");
}

TEST(MemoryEstimate, InferenceNamesTheFileFieldsAndTheOption) {
  ModelConfig m = testing::micro_model(400, 32);
  m.n_layers = 1000000000;
  InferenceWorkload eval;
  eval.batch = 8;
  eval.seq_len_option = "--seq-len";
  std::string message = inference_error(m, eval, hf_model_key_names("hf/config.json"));
  EXPECT_HAS(message, "the model does not fit in memory");
  EXPECT_HAS(message, "num_hidden_layers=1000000000 (sizes from hf/config.json)");
  EXPECT_HAS(message, "--skip-memory-check");

  // A long default window: max_seq_len and --seq-len, both of which shrink it.
  m = testing::micro_model(400, 1 << 20);
  message = inference_error(m, eval);
  EXPECT_HAS(message, "model.max_seq_len=1048576");
  EXPECT_HAS(message, "--seq-len=1048576");
  EXPECT_HAS(message, "or a smaller --seq-len");
  eval.seq_len = 128;
  EXPECT_HAS(check_inference_memory(m, {}, eval, {}, gib(64)), "margin");
}

TEST(MemoryEstimate, OverrideAndUnknownMemoryOnlyReport) {
  Config c;
  c.model.n_layers = 100000000;
  c.parallel.skip_memory_check = true;
  const std::string line = check_training_memory(c, 1, 1, gib(1));
  EXPECT_HAS(line, "not checked: parallel.skip_memory_check is true");
  EXPECT_HAS(line, "margin -");
  c.parallel.skip_memory_check = false;
  EXPECT_HAS(check_training_memory(c, 1, 1, std::nullopt), "available memory unknown");

  InferenceWorkload skip;
  skip.skip_check = true;
  EXPECT_HAS(check_inference_memory(c.model, {}, skip, {}, gib(1)), "not checked");
}

TEST(MemoryEstimate, ExtremeValuesNeitherOverflowNorWrap) {
  const int64_t big = std::numeric_limits<int64_t>::max();
  Config c;
  c.model.vocab_size = c.model.dim = c.model.n_layers = c.model.n_heads = c.model.n_kv_heads = big;
  c.model.multiple_of = c.model.max_seq_len = c.data.seq_len = big;
  c.training.micro_batch_size = big;
  c.model.ffn_dim_multiplier = std::numeric_limits<double>::max();
  ConverterConfig lora;
  lora.type = "lora";
  lora.rank = big;
  c.converters = {lora};
  c.converters[0].target_modules = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"};
  for (int world : {1, 4}) {
    const long double total = estimate_training_memory(c, world).total();
    EXPECT_FALSE(std::isnan(total));
    EXPECT_GT(total, 1e30L);
  }
  EXPECT_HAS(training_error(c), "does not fit in memory");
  InferenceWorkload w;
  w.batch = big;
  w.seq_len = big;
  EXPECT_GT(estimate_inference_memory(c.model, c.converters, w).total(), 1e30L);
  // Negative sizes (never past validation) count as nothing rather than as negative memory.
  Config negative;
  negative.model.n_layers = -5;
  negative.model.vocab_size = -1;
  EXPECT_GE(estimate_training_memory(negative, 1).total(), 0);
  // Formatting covers the whole range.
  EXPECT_EQ(format_bytes(512), "512 bytes");
  EXPECT_EQ(format_bytes(1.5L * kGiB), "1.50 GiB");
  EXPECT_EQ(format_bytes(-2.0L * kGiB), "-2.00 GiB");
  EXPECT_HAS(format_bytes(1e30L), "EiB");
  EXPECT_EQ(format_bytes(std::numeric_limits<long double>::infinity()), "an unbounded amount");
}

void write(const std::filesystem::path& path, const std::string& text) {
  std::filesystem::create_directories(path.parent_path());
  std::ofstream(path) << text;
}

TEST(MemoryEstimate, AvailableMemoryIsTheLeastOfMemAvailableAndCgroupRoom) {
  testing::TempDir root;
  const std::filesystem::path r = root.path();
  EXPECT_FALSE(available_memory(r.string()).has_value());  // nothing to read
  write(r / "proc/meminfo", "MemTotal:  67108864 kB\nMemAvailable:   33554432 kB\nCached: 1 kB\n");
  std::optional<AvailableMemory> got = available_memory(r.string());
  ASSERT_TRUE(got);
  EXPECT_EQ(got->bytes, 32 * kGiB);
  EXPECT_EQ(got->source, "MemAvailable");

  // cgroup v2: the job's group has no limit ("max"), its parent 8 GiB of which 3 GiB are in
  // use, 1 GiB of that inactive page cache.
  write(r / "proc/self/cgroup", "0::/jobs/job1\n");
  write(r / "sys/fs/cgroup/jobs/job1/memory.max", "max\n");
  write(r / "sys/fs/cgroup/jobs/job1/memory.current", "1073741824\n");
  write(r / "sys/fs/cgroup/jobs/memory.max", "8589934592\n");
  write(r / "sys/fs/cgroup/jobs/memory.current", "3221225472\n");
  write(r / "sys/fs/cgroup/jobs/memory.stat", "anon 2147483648\ninactive_file 1073741824\n");
  got = available_memory(r.string());
  ASSERT_TRUE(got);
  EXPECT_EQ(got->bytes, 6 * kGiB);
  EXPECT_HAS(got->source, "jobs/memory.max");

  // cgroup v1: "no limit" is a number near 2^63; a real limit counts.
  write(r / "proc/self/cgroup", "4:memory:/batch\n3:cpu,cpuacct:/batch\n");
  write(r / "sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n");
  write(r / "sys/fs/cgroup/memory/batch/memory.limit_in_bytes", "4294967296\n");
  write(r / "sys/fs/cgroup/memory/batch/memory.usage_in_bytes", "1073741824\n");
  got = available_memory(r.string());
  ASSERT_TRUE(got);
  EXPECT_EQ(got->bytes, 3 * kGiB);
  EXPECT_HAS(got->source, "memory.limit_in_bytes");

  // This machine: something positive, if it is Linux.
  if (std::filesystem::exists("/proc/meminfo")) {
    const std::optional<AvailableMemory> here = available_memory();
    ASSERT_TRUE(here);
    EXPECT_GT(here->bytes, 0);
  }
}

TEST(MemoryEstimate, ValidationCapsSizesAndReadsTheOverride) {
  const std::string yaml = "data:\n  train: data/train_*.bin\n";
  auto error_of = [&](const std::string& override_text) {
    try {
      parse_config(yaml, "job.yaml", {override_text});
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_HAS(error_of("model.vocab_size=1000000000000"),
             "model.vocab_size = 1000000000000 exceeds 2147483648 (2^31)");
  EXPECT_HAS(error_of("model.n_layers=3000000000"), "(--set model.n_layers=3000000000)");
  EXPECT_HAS(error_of("model.max_seq_len=1000000000000"), "model.max_seq_len = 1000000000000");
  EXPECT_HAS(error_of("data.seq_len=4294967296"), "data.seq_len = 4294967296 exceeds");
  EXPECT_HAS(error_of("model.ffn_dim_multiplier=1e300"), "model.ffn_dim_multiplier = 1e+300");
  EXPECT_HAS(error_of("model.dim=0"), "model.dim = 0 must be positive");
  EXPECT_HAS(error_of("parallel.skip_memory_check=maybe"), "must be true or false");
  // Sizes below the cap pass validation: the memory check judges them.
  EXPECT_EQ(error_of("model.n_layers=100000000"), "accepted");
  const Config c = parse_config(yaml, "job.yaml", {"parallel.skip_memory_check=true"});
  EXPECT_TRUE(c.parallel.skip_memory_check);
  EXPECT_HAS(to_yaml(c), "  skip_memory_check: true\n");
  EXPECT_FALSE(parse_config(yaml, "job.yaml", {}).parallel.skip_memory_check);
}

}  // namespace
}  // namespace strata
