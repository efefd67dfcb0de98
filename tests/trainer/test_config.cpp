// Config: defaults, overrides, every error with its message, round trip through YAML.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "trainer/config.h"

namespace strata {
namespace {

const char* kMinimal = "data:\n  train: data/train_*.bin\n";

Config parse(const std::string& text, const std::vector<std::string>& overrides = {},
             int world_size = 1) {
  return parse_config(text, "job.yaml", overrides, world_size);
}

// The ConfigError message of parsing `text` with `overrides` (fails the test if none).
std::string error_of(const std::string& text, const std::vector<std::string>& overrides = {},
                     int world_size = 1) {
  try {
    parse(text, overrides, world_size);
  } catch (const ConfigError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a ConfigError for:\n" << text;
  return "";
}

#define EXPECT_HAS(haystack, needle) EXPECT_NE(std::string(haystack).find(needle), std::string::npos) \
    << "message: " << (haystack) << "\nexpected to contain: " << (needle)

TEST(Config, AbsentKeysTakeTheDesignDefaults) {
  const Config c = parse(kMinimal);
  EXPECT_EQ(c.model.dim, 128);
  EXPECT_EQ(c.model.n_kv_heads, 2);
  EXPECT_FALSE(c.model.ffn_dim_multiplier.has_value());
  EXPECT_DOUBLE_EQ(c.optimizer.lr, 3.0e-3);
  EXPECT_EQ(c.optimizer.betas, (std::vector<double>{0.9, 0.95}));
  EXPECT_EQ(c.lr_scheduler.decay, LrDecay::kCosine);
  EXPECT_EQ(c.parallel.threads_per_rank, 0);
  EXPECT_FALSE(c.checkpoint.enable);
  EXPECT_TRUE(c.converters.empty());
  EXPECT_EQ(c.data.train, "data/train_*.bin");
  EXPECT_FALSE(c.data.val.has_value());
}

TEST(Config, ReadsEverySectionFromYaml) {
  const Config c = parse(R"(
job: {name: j, run_dir: out/j, seed: 9}
model: {vocab_size: 512, dim: 64, n_layers: 3, n_heads: 8, n_kv_heads: 4, multiple_of: 32,
        ffn_dim_multiplier: 1.5, norm_eps: 1.0e-6, rope_theta: 500000.0, max_seq_len: 256,
        tie_embeddings: true}
data: {train: a.bin, val: b.bin, tokenizer: t.model, seq_len: 64}
training: {steps: 10, global_batch_size: 12, micro_batch_size: 4, grad_clip: 0.5,
           eval_interval: 0, eval_batches: 2, log_interval: 1}
optimizer: {lr: 1.0e-4, betas: [0.8, 0.9], eps: 1.0e-6, weight_decay: 0.0}
lr_scheduler: {warmup_steps: 2, decay: linear, min_lr_ratio: 0.0}
parallel: {backend: mpi, threads_per_rank: 3, fsdp: {enabled: false, activation_checkpointing: none}}
logging: {metrics_file: m.jsonl, peak_tflops: 1.5}
)");
  EXPECT_EQ(c.job.seed, 9);
  EXPECT_EQ(c.model.n_heads, 8);
  EXPECT_DOUBLE_EQ(*c.model.ffn_dim_multiplier, 1.5);
  EXPECT_TRUE(c.model.tie_embeddings);
  EXPECT_EQ(*c.data.val, "b.bin");
  EXPECT_EQ(c.training.global_batch_size, 12);
  EXPECT_EQ(c.optimizer.betas, (std::vector<double>{0.8, 0.9}));
  EXPECT_EQ(c.lr_scheduler.decay, LrDecay::kLinear);
  EXPECT_EQ(c.parallel.threads_per_rank, 3);
  EXPECT_FALSE(c.parallel.fsdp.enabled);
  EXPECT_EQ(c.parallel.fsdp.activation_checkpointing, "none");
  EXPECT_DOUBLE_EQ(c.logging.peak_tflops, 1.5);
}

TEST(Config, OverridesAreTypedBySchema) {
  const Config c = parse(kMinimal, {"model.dim=256", "optimizer.lr=0.01", "model.tie_embeddings=true",
                                    "job.name=run two", "data.val=null", "data.val=v.bin",
                                    "optimizer.betas=[0.9,0.99]", "parallel.threads_per_rank=auto",
                                    "model.ffn_dim_multiplier=1.3", "lr_scheduler.decay=none",
                                    "checkpoint.exclude_from_loading=[a, b]"});
  EXPECT_EQ(c.model.dim, 256);
  EXPECT_DOUBLE_EQ(c.optimizer.lr, 0.01);
  EXPECT_TRUE(c.model.tie_embeddings);
  EXPECT_EQ(c.job.name, "run two");
  EXPECT_EQ(*c.data.val, "v.bin");  // later overrides win
  EXPECT_EQ(c.optimizer.betas, (std::vector<double>{0.9, 0.99}));
  EXPECT_EQ(c.parallel.threads_per_rank, 0);
  EXPECT_EQ(c.lr_scheduler.decay, LrDecay::kNone);
  EXPECT_EQ(c.checkpoint.exclude_from_loading, (std::vector<std::string>{"a", "b"}));
  EXPECT_FALSE(parse(kMinimal, {"data.val=v.bin", "data.val=null"}).data.val.has_value());
  // An override may supply a required key and create a section.
  EXPECT_EQ(parse("", {"data.train=x.bin"}).data.train, "x.bin");
}

TEST(Config, UnknownKeySuggestsTheClosestName) {
  const std::string e = error_of(std::string(kMinimal) + "model:\n  n_layer: 3\n");
  EXPECT_HAS(e, "unknown key model.n_layer");
  EXPECT_HAS(e, "job.yaml:4:3");
  EXPECT_HAS(e, "HINT: did you mean model.n_layers?");
}

TEST(Config, UnknownKeyFarFromAllListsTheValidOnes) {
  const std::string e = error_of(std::string(kMinimal) + "optimizer:\n  momentum_schedule: 3\n");
  EXPECT_HAS(e, "unknown key optimizer.momentum_schedule");
  EXPECT_HAS(e, "valid keys here: optimizer.name, optimizer.lr");
}

TEST(Config, UnknownSectionIsAnError) {
  const std::string e = error_of(std::string(kMinimal) + "trainig:\n  steps: 3\n");
  EXPECT_HAS(e, "unknown key trainig");
  EXPECT_HAS(e, "did you mean training?");
}

TEST(Config, UnknownKeyInAnOverrideNamesTheOverride) {
  const std::string e = error_of(kMinimal, {"model.n_layer=3"});
  EXPECT_HAS(e, "unknown key model.n_layer");
  EXPECT_HAS(e, "(--set model.n_layer=3)");
  EXPECT_HAS(e, "did you mean model.n_layers?");
}

TEST(Config, WrongTypesSayWhatWasExpected) {
  struct Case {
    std::string yaml, expected;
  } cases[] = {
      {"model:\n  dim: abc\n", "model.dim must be an integer, got 'abc' (job.yaml:4:8)"},
      {"model:\n  dim: 1.5\n", "model.dim must be an integer, got '1.5'"},
      {"optimizer:\n  lr: fast\n", "optimizer.lr must be a number, got 'fast'"},
      {"model:\n  tie_embeddings: maybe\n", "model.tie_embeddings must be true or false"},
      {"job:\n  name: [a, b]\n", "job.name must be a string, got '[a, b]'"},
      {"model: 5\n", "model must be a mapping of keys, got '5'"},
      {"optimizer:\n  betas: 0.9\n", "optimizer.betas must be a list"},
      {"parallel:\n  threads_per_rank: many\n", "parallel.threads_per_rank must be an integer"},
      {"lr_scheduler:\n  decay: exponential\n",
       "lr_scheduler.decay = 'exponential' is not one of: cosine, linear, none"},
      {"converters: {type: lora}\n", "converters must be a list"},
  };
  for (const Case& c : cases) EXPECT_HAS(error_of(std::string(kMinimal) + c.yaml), c.expected);
}

TEST(Config, OutOfRangeAndInconsistentValuesAreRejected) {
  struct Case {
    std::vector<std::string> overrides;
    std::string expected;
  } cases[] = {
      {{"model.dim=0"}, "model.dim = 0 must be positive"},
      {{"training.steps=-1"}, "training.steps = -1 must be positive"},
      {{"model.n_heads=5"}, "model.n_heads = 5 does not divide model.dim = 128"},
      {{"model.n_kv_heads=3"}, "model.n_kv_heads = 3 does not divide model.n_heads = 4"},
      {{"model.dim=96", "model.n_heads=32", "model.n_kv_heads=1"}, "odd head dimension"},
      {{"data.seq_len=256"}, "data.seq_len = 256 exceeds model.max_seq_len = 128"},
      {{"training.global_batch_size=12"},
       "training.global_batch_size = 12 is not divisible by micro_batch_size 8 x 1 rank(s)"},
      {{"optimizer.lr=0"}, "optimizer.lr = 0 must be positive"},
      {{"optimizer.betas=[0.9, 1.0]"}, "optimizer.betas entry 1 is outside [0, 1)"},
      {{"optimizer.betas=[0.9]"}, "optimizer.betas must have 2 entries, got 1"},
      {{"lr_scheduler.min_lr_ratio=1.5"}, "lr_scheduler.min_lr_ratio = 1.5 must be in [0, 1]"},
      {{"lr_scheduler.warmup_steps=-1"}, "lr_scheduler.warmup_steps = -1 must be >= 0"},
      {{"training.eval_interval=-5"}, "training.eval_interval must be >= 0"},
      {{"parallel.threads_per_rank=0"}, "parallel.threads_per_rank = 0 must be `auto` or a positive integer"},
      {{"model.name=gpt2"}, "model.name = 'gpt2' is not one of: llama"},
      {{"optimizer.name=sgd"}, "optimizer.name = 'sgd' is not one of: adamw"},
      {{"parallel.mixed_precision.param_dtype=int8"}, "is not one of: float32, bfloat16, float16"},
      {{"logging.peak_tflops=-1"}, "logging.peak_tflops must be >= 0"},
  };
  for (const Case& c : cases) EXPECT_HAS(error_of(kMinimal, c.overrides), c.expected);
}

TEST(Config, GlobalBatchMustSplitOverRanks) {
  EXPECT_NO_THROW(parse(kMinimal, {}, 2));  // 16 = 8 x 1 x 2
  const std::string e = error_of(kMinimal, {}, 4);
  EXPECT_HAS(e, "training.global_batch_size = 16 is not divisible by micro_batch_size 8 x 4 rank(s) = 32");
  EXPECT_HAS(e, "HINT: global_batch_size = micro_batch_size x gradient accumulation steps x ranks");
}

TEST(Config, CrossFieldErrorsPointAtTheYamlLine) {
  const std::string e = error_of("data:\n  train: x\nmodel:\n  dim: 128\n  n_heads: 6\n");
  EXPECT_HAS(e, "model.n_heads = 6 does not divide model.dim = 128 (job.yaml:5:12)");
}

TEST(Config, MissingRequiredKeyIsNamed) {
  const std::string e = error_of("model:\n  dim: 64\n");
  EXPECT_HAS(e, "missing required key data.train");
  EXPECT_HAS(e, "HINT: add `data.train:`");
  EXPECT_HAS(error_of(std::string(kMinimal) + "converters:\n  - rank: 4\n"),
             "missing required key converters.0.type");
}

TEST(Config, FeaturesNotBuiltYetAcceptOnlyTheirDefault) {
  struct Case {
    std::string override_text, expected;
  } cases[] = {
      {"checkpoint.enable=true", "checkpoint.enable = true is not supported yet"},
      {"checkpoint.resume_path=runs/x", "checkpoint.resume_path = runs/x is not supported yet"},
      {"checkpoint.additional_load_paths=[a]", "checkpoint.additional_load_paths = a non-empty list is not supported yet"},
      {"converters=[{type: lora, rank: 4}]", "converters = a non-empty list is not supported yet"},
      {"parallel.backend=nccl", "parallel.backend = nccl is not supported yet"},
      {"parallel.mixed_precision.param_dtype=bfloat16", "param_dtype = bfloat16 is not supported yet"},
  };
  for (const Case& c : cases) {
    const std::string e = error_of(kMinimal, {c.override_text});
    EXPECT_HAS(e, c.expected);
    EXPECT_HAS(e, "HINT: this build accepts only");
  }
  // Other checkpoint keys are still checked while checkpointing is off.
  EXPECT_HAS(error_of(kMinimal, {"checkpoint.interval=abc"}), "checkpoint.interval must be an integer");
  EXPECT_NO_THROW(parse(kMinimal, {"checkpoint.enable=false", "checkpoint.interval=50"}));
  // Converter entries are type-checked before the list is rejected.
  EXPECT_HAS(error_of(kMinimal, {"converters=[{type: lora, rank: x}]"}), "converters.0.rank must be an integer");
  EXPECT_HAS(error_of(kMinimal, {"converters=[{type: prune}]"}), "converters.0.type = 'prune' is not one of: lora");
}

TEST(Config, BadOverrideSyntaxQuotesTheOverride) {
  EXPECT_HAS(error_of(kMinimal, {"model.dim"}), "override 'model.dim' has no '='");
  EXPECT_HAS(error_of(kMinimal, {"=5"}), "override '=5' has an empty key");
  EXPECT_HAS(error_of(kMinimal, {"model..dim=5"}), "override 'model..dim=5' has an empty key");
  EXPECT_HAS(error_of(kMinimal, {"model.dim=[1, 2"}), "the value of override 'model.dim=[1, 2' is not valid YAML");
  EXPECT_HAS(error_of(std::string(kMinimal) + "model:\n  dim: 64\n", {"model.dim.x=5"}),
             "override 'model.dim.x=5': model.dim is a value, not a section");
  // A key created under a section that does not take keys: the override is named.
  EXPECT_HAS(error_of(kMinimal, {"model.dim.x=5"}),
             "model.dim must be an integer, got '{x: 5}' (--set model.dim.x=5)");
  EXPECT_HAS(error_of(kMinimal, {"model.dim=abc"}), "model.dim must be an integer, got 'abc' (--set model.dim=abc)");
}

TEST(Config, ConverterEntriesCanBeOverriddenByIndex) {
  const std::string two = std::string(kMinimal) + "converters:\n  - type: lora\n";
  EXPECT_HAS(error_of(two, {"converters.0.rank=x"}), "converters.0.rank must be an integer, got 'x' (--set converters.0.rank=x)");
  EXPECT_HAS(error_of(two, {"converters.3.rank=4"}), "converters has 1 entries, '3' is not an index of it");
  EXPECT_NO_THROW(parse(two, {"converters=[]"}));
}

TEST(Config, YamlSyntaxErrorNamesTheLine) {
  const std::string e = error_of("data:\n  train: x\nmodel: {dim: 4\n");
  EXPECT_HAS(e, "invalid YAML");
  EXPECT_HAS(e, "job.yaml:");
}

TEST(Config, MissingFileIsNamed) {
  try {
    load_config("/nonexistent/strata.yaml", {});
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_HAS(e.what(), "cannot read config file /nonexistent/strata.yaml");
  }
}

TEST(Config, ResolvedYamlRoundTrips) {
  const Config original = parse(kMinimal, {"model.ffn_dim_multiplier=1.3", "job.name='a: b \"c\"'",
                                           "model.norm_eps=1e-05", "model.rope_theta=500000",
                                           "data.val=v_*.bin", "optimizer.weight_decay=0",
                                           "parallel.threads_per_rank=2", "job.run_dir=123",
                                           "checkpoint.exclude_from_loading=[x, \"y z\"]"});
  const std::string yaml = to_yaml(original);
  EXPECT_HAS(yaml, "norm_eps: 1.0e-05");
  EXPECT_HAS(yaml, "rope_theta: 500000.0");
  EXPECT_HAS(yaml, "weight_decay: 0.0");
  EXPECT_HAS(yaml, "resume_path: null");
  EXPECT_HAS(yaml, "converters: []");
  const Config again = parse(yaml);
  EXPECT_EQ(to_yaml(again), yaml);
  EXPECT_EQ(again.job.name, "a: b \"c\"");
  EXPECT_EQ(again.job.run_dir, "123");
  EXPECT_EQ(*again.model.ffn_dim_multiplier, 1.3);
  EXPECT_EQ(again.model.norm_eps, 1e-05);
  EXPECT_EQ(again.parallel.threads_per_rank, 2);
  EXPECT_EQ(again.checkpoint.exclude_from_loading, (std::vector<std::string>{"x", "y z"}));
  // Defaults print `auto` for threads.
  EXPECT_HAS(to_yaml(parse(kMinimal)), "threads_per_rank: auto");
}

TEST(Config, ConvertersRoundTripAsABlockList) {
  Config c = parse(kMinimal);
  c.converters.push_back(ConverterConfig{"lora", 4, 8.0, 0.1, {"wq", "wk"}, "merged"});
  const std::string yaml = to_yaml(c);
  EXPECT_HAS(yaml, "converters:\n  - type: lora\n    rank: 4\n");
  // Reading back fails only on the not-yet-supported check, after parsing every field.
  EXPECT_HAS(error_of(yaml), "converters = a non-empty list is not supported yet");
}

TEST(Config, FfnHiddenDimFollowsMetasFormula) {
  ModelConfig m;
  m.dim = 4096;
  m.multiple_of = 256;
  EXPECT_EQ(m.ffn_hidden_dim(), 11008);  // Llama-2 7B
  m.dim = 128;
  m.multiple_of = 64;
  EXPECT_EQ(m.ffn_hidden_dim(), 384);
  m.dim = 4096;
  m.multiple_of = 1024;
  m.ffn_dim_multiplier = 1.3;
  EXPECT_EQ(m.ffn_hidden_dim(), 14336);  // Llama-3 8B
}

}  // namespace
}  // namespace strata
