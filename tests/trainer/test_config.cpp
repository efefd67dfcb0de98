// Config: defaults, overrides, every error with its message, round trip through YAML.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "trainer/config/config.h"

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

std::string with_minimal(const std::string& yaml) {
  return std::string(kMinimal) + yaml;
}

#define EXPECT_HAS(haystack, needle)                               \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) \
      << "message: " << (haystack) << "\nexpected to contain: " << (needle)

// ---- reading ----------------------------------------------------------------------------

TEST(Config, AbsentKeysTakeTheDesignDefaults) {
  const Config c = parse(kMinimal);
  EXPECT_EQ(c.job.name, "tiny");
  EXPECT_EQ(c.job.seed, 1234);
  EXPECT_EQ(c.model.name, "llama");
  EXPECT_EQ(c.model.vocab_size, 2048);
  EXPECT_EQ(c.model.dim, 128);
  EXPECT_EQ(c.model.n_kv_heads, 2);
  EXPECT_FALSE(c.model.ffn_dim_multiplier.has_value());
  EXPECT_DOUBLE_EQ(c.model.norm_eps, 1.0e-5);
  EXPECT_DOUBLE_EQ(c.model.rope_theta, 10000.0);
  EXPECT_EQ(c.data.train, "data/train_*.bin");
  EXPECT_FALSE(c.data.val.has_value());
  EXPECT_FALSE(c.data.tokenizer.has_value());
  EXPECT_EQ(c.data.seq_len, 128);
  EXPECT_EQ(c.training.steps, 200);
  EXPECT_EQ(c.training.eval_interval, 50);
  EXPECT_DOUBLE_EQ(c.optimizer.lr, 3.0e-3);
  EXPECT_EQ(c.optimizer.betas, (std::vector<double>{0.9, 0.95}));
  EXPECT_EQ(c.lr_scheduler.warmup_steps, 20);
  EXPECT_EQ(c.lr_scheduler.decay, LrDecay::kCosine);
  EXPECT_EQ(c.parallel.device, "auto");
  EXPECT_EQ(c.parallel.backend, "auto");
  EXPECT_EQ(c.parallel.threads_per_rank, 0);
  EXPECT_TRUE(c.parallel.fsdp.enabled);
  EXPECT_EQ(c.parallel.fsdp.activation_checkpointing, "auto");
  EXPECT_EQ(c.parallel.fsdp.mixed_precision.param_dtype, "float32");
  EXPECT_EQ(c.parallel.fsdp.mixed_precision.reduce_dtype, "float32");
  EXPECT_TRUE(c.checkpoint.enable);
  EXPECT_EQ(c.checkpoint.keep_latest_k, 3);
  EXPECT_FALSE(c.checkpoint.model_only);
  EXPECT_FALSE(c.checkpoint.load_step.has_value());
  EXPECT_EQ(c.checkpoint.interval, 100);
  EXPECT_FALSE(c.checkpoint.resume_path.has_value());
  EXPECT_TRUE(c.checkpoint.additional_load_paths.empty());
  EXPECT_TRUE(c.converters.empty());
  EXPECT_EQ(c.logging.metrics_file, "metrics.jsonl");
  EXPECT_DOUBLE_EQ(c.logging.peak_tflops, 0.0);
}

TEST(Config, EmptySectionsAndNullListsTakeTheDefaults) {
  const Config c = parse(with_minimal("model:\nconverters:\njob: {}\n"));
  EXPECT_EQ(c.model.dim, 128);
  EXPECT_EQ(c.job.name, "tiny");
  EXPECT_TRUE(c.converters.empty());
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
checkpoint: {enable: false, folder: ck, interval: 7, exclude_from_loading: [optimizer]}
converters: []
logging: {metrics_file: m.jsonl, peak_tflops: 1.5}
)");
  EXPECT_EQ(c.job.seed, 9);
  EXPECT_EQ(c.model.n_heads, 8);
  EXPECT_DOUBLE_EQ(*c.model.ffn_dim_multiplier, 1.5);
  EXPECT_DOUBLE_EQ(c.model.norm_eps, 1.0e-6);
  EXPECT_TRUE(c.model.tie_embeddings);
  EXPECT_EQ(*c.data.val, "b.bin");
  EXPECT_EQ(*c.data.tokenizer, "t.model");
  EXPECT_EQ(c.training.global_batch_size, 12);
  EXPECT_EQ(c.training.eval_interval, 0);
  EXPECT_EQ(c.optimizer.betas, (std::vector<double>{0.8, 0.9}));
  EXPECT_EQ(c.lr_scheduler.decay, LrDecay::kLinear);
  EXPECT_EQ(c.parallel.backend, "mpi");
  EXPECT_EQ(c.parallel.threads_per_rank, 3);
  EXPECT_FALSE(c.parallel.fsdp.enabled);
  EXPECT_EQ(c.parallel.fsdp.activation_checkpointing, "none");
  EXPECT_EQ(c.checkpoint.folder, "ck");
  EXPECT_EQ(c.checkpoint.interval, 7);
  EXPECT_EQ(c.checkpoint.exclude_from_loading, (std::vector<std::string>{"optimizer"}));
  EXPECT_DOUBLE_EQ(c.logging.peak_tflops, 1.5);
}

TEST(Config, IntegersAreAcceptedForFloatKeys) {
  const Config c =
      parse(with_minimal("model: {rope_theta: 500000}\noptimizer: {weight_decay: 0}\n"));
  EXPECT_DOUBLE_EQ(c.model.rope_theta, 500000.0);
  EXPECT_DOUBLE_EQ(c.optimizer.weight_decay, 0.0);
}

TEST(Config, LoadConfigReadsAFileAndNamesItInErrors) {
  const std::string path = ::testing::TempDir() + "strata_test_config.yaml";
  {
    std::ofstream out(path);
    out << "data:\n  train: x.bin\nmodel:\n  dim: 64\n  n_heads: abc\n";
  }
  const std::string e = [&] {
    try {
      load_config(path, {});
    } catch (const ConfigError& error) {
      return std::string(error.what());
    }
    return std::string("no error");
  }();
  EXPECT_HAS(e, "model.n_heads must be an integer, got 'abc' (" + path + ":5:3)");
  EXPECT_EQ(load_config(path, {"model.n_heads=4"}).model.dim, 64);
  std::remove(path.c_str());
}

// ---- overrides --------------------------------------------------------------------------

TEST(Config, OverridesAreTypedBySchema) {
  const Config c =
      parse(kMinimal,
            {"model.dim=256", "optimizer.lr=0.01", "model.tie_embeddings=true", "job.name=run two",
             "data.val=null", "data.val=v.bin", "optimizer.betas=[0.9,0.99]",
             "parallel.threads_per_rank=auto", "model.ffn_dim_multiplier=1.3",
             "lr_scheduler.decay=none", "checkpoint.exclude_from_loading=[rng, dataloader]"});
  EXPECT_EQ(c.model.dim, 256);                                     // int
  EXPECT_DOUBLE_EQ(c.optimizer.lr, 0.01);                          // float
  EXPECT_TRUE(c.model.tie_embeddings);                             // bool
  EXPECT_EQ(c.job.name, "run two");                                // string
  EXPECT_EQ(*c.data.val, "v.bin");                                 // later overrides win
  EXPECT_EQ(c.optimizer.betas, (std::vector<double>{0.9, 0.99}));  // list
  EXPECT_EQ(c.parallel.threads_per_rank, 0);
  EXPECT_DOUBLE_EQ(*c.model.ffn_dim_multiplier, 1.3);
  EXPECT_EQ(c.lr_scheduler.decay, LrDecay::kNone);
  EXPECT_EQ(c.checkpoint.exclude_from_loading, (std::vector<std::string>{"rng", "dataloader"}));
}

TEST(Config, NullOverrideClearsAnOptionalSetInTheFile) {
  const Config c =
      parse(with_minimal("  val: v.bin\n  tokenizer: t.model\nmodel:\n  ffn_dim_multiplier: 1.3\n"),
            {"data.val=null", "data.tokenizer=~", "model.ffn_dim_multiplier=null"});
  EXPECT_FALSE(c.data.val.has_value());
  EXPECT_FALSE(c.data.tokenizer.has_value());
  EXPECT_FALSE(c.model.ffn_dim_multiplier.has_value());
}

TEST(Config, OverrideReplacesTheFileValue) {
  const Config c = parse(with_minimal("model:\n  dim: 64\n  n_heads: 4\n"), {"model.dim=256"});
  EXPECT_EQ(c.model.dim, 256);
  EXPECT_EQ(c.model.n_heads, 4);
}

TEST(Config, OverrideCanSupplyTheRequiredKeyAndCreateSections) {
  const Config c = parse("", {"data.train=x.bin", "parallel.fsdp.enabled=false"});
  EXPECT_EQ(c.data.train, "x.bin");
  EXPECT_FALSE(c.parallel.fsdp.enabled);
}

TEST(Config, OverrideCanReplaceAWholeSection) {
  const Config c = parse(with_minimal("model: {dim: 64, n_layers: 9}\n"), {"model={dim: 256}"});
  EXPECT_EQ(c.model.dim, 256);
  EXPECT_EQ(c.model.n_layers, 4);  // the file's section is gone, defaults apply
  EXPECT_HAS(error_of(kMinimal, {"model={dim: abc}"}),
             "model.dim must be an integer, got 'abc' (--set model={dim: abc})");
}

TEST(Config, OverrideValueMayContainEqualsSigns) {
  EXPECT_EQ(parse(kMinimal, {"job.name=a=b"}).job.name, "a=b");
}

TEST(Config, ConverterEntriesCanBeOverriddenByIndex) {
  const std::string one = with_minimal("converters:\n  - type: lora\n");
  // Every non-empty converter list is rejected for now, so the override shows in the message
  // of the check it trips, which names the override as the source.
  EXPECT_HAS(error_of(one, {"converters.0.rank=x"}),
             "converters.0.rank must be an integer, got 'x' (--set converters.0.rank=x)");
  EXPECT_HAS(error_of(one, {"converters.0.rank=0"}),
             "converters.0.rank = 0 must be positive (--set converters.0.rank=0)");
  EXPECT_HAS(
      error_of(one, {"converters.0.type=prune"}),
      "converters.0.type = 'prune' is not one of: lora, int8_qat (--set converters.0.type=prune)");
  EXPECT_HAS(
      error_of(one, {"converters.0={type: lora, rank: y}"}),
      "converters.0.rank must be an integer, got 'y' (--set converters.0={type: lora, rank: y})");
  EXPECT_HAS(error_of(one, {"converters.0.rnk=4"}),
             "unknown key converters.0.rnk (--set converters.0.rnk=4)");
  EXPECT_HAS(error_of(one, {"converters.0.target_modules=[wq, lm_head]"}),
             "converters.0.target_modules = 'lm_head' is not one of: wq, wk, wv, wo, w1, w2, w3");
  EXPECT_HAS(error_of(one, {"converters.0.dropout=1"}),
             "converters.0.dropout = 1 must be in [0, 1)");
  EXPECT_HAS(error_of(one, {"converters.0.save=some"}),
             "converters.0.save = 'some' is not one of: full, adapter_only");
  EXPECT_HAS(error_of(one, {"converters=[{type: lora}, {type: lora}]"}),
             "converters.1.type = 'lora' appears twice");
  const std::string e = error_of(one, {"converters.3.rank=4"});
  EXPECT_HAS(e, "converters has 1 entry, '3' is not an index of it (--set converters.3.rank=4)");
  EXPECT_HAS(e, "HINT: to replace the whole list: --set converters=[...]");
  EXPECT_HAS(error_of(one, {"converters.first.rank=4"}), "'first' is not an index of it");
  EXPECT_TRUE(parse(one, {"converters=[]"}).converters.empty());
  // Without a converters list there is no entry to override.
  EXPECT_HAS(error_of(kMinimal, {"converters.0.rank=4"}),
             "converters has 0 entries, '0' is not an index of it (--set converters.0.rank=4)");
}

TEST(Config, BadOverrideSyntaxQuotesTheOverride) {
  EXPECT_HAS(error_of(kMinimal, {"model.dim"}),
             "override 'model.dim' has no '=' (--set model.dim)");
  EXPECT_HAS(error_of(kMinimal, {"model.dim"}), "HINT: write --set section.key=value");
  EXPECT_HAS(error_of(kMinimal, {"=5"}), "override '=5' has an empty key");
  EXPECT_HAS(error_of(kMinimal, {"model..dim=5"}), "override 'model..dim=5' has an empty key");
  EXPECT_HAS(error_of(kMinimal, {"model.dim.=5"}), "override 'model.dim.=5' has an empty key");
  EXPECT_HAS(error_of(kMinimal, {"model.dim=[1, 2"}),
             "the value of override 'model.dim=[1, 2' is not valid YAML");
  EXPECT_HAS(error_of(with_minimal("model:\n  dim: 64\n"), {"model.dim.x=5"}),
             "override 'model.dim.x=5': model.dim is a value, not a section");
  // A key created under a key that takes no keys: the override is named.
  EXPECT_HAS(error_of(kMinimal, {"model.dim.x=5"}),
             "model.dim must be an integer, got '{x: 5}' (--set model.dim.x=5)");
}

// ---- unknown keys -----------------------------------------------------------------------

TEST(Config, UnknownKeySuggestsTheClosestName) {
  const std::string e = error_of(with_minimal("model:\n  n_layer: 3\n"));
  EXPECT_HAS(e, "config error: unknown key model.n_layer (job.yaml:4:3)");
  EXPECT_HAS(e, "\nHINT: did you mean model.n_layers?");
  EXPECT_HAS(error_of(with_minimal("parallel:\n  fsdp:\n    enable: false\n")),
             "did you mean parallel.fsdp.enabled?");
}

TEST(Config, UnknownKeyFarFromAllListsTheValidOnes) {
  const std::string e = error_of(with_minimal("optimizer:\n  momentum_schedule: 3\n"));
  EXPECT_HAS(e, "unknown key optimizer.momentum_schedule");
  EXPECT_HAS(e,
             "HINT: valid keys here: optimizer.name, optimizer.lr, optimizer.betas, "
             "optimizer.eps, optimizer.weight_decay");
  // A short key is not "close" to another short key it shares nothing with.
  EXPECT_HAS(error_of(with_minimal("optimizer:\n  xy: 3\n")), "valid keys here");
}

TEST(Config, UnknownSectionSuggestsTheClosestSection) {
  const std::string e = error_of(with_minimal("trainig:\n  steps: 3\n"));
  EXPECT_HAS(e, "unknown section trainig (job.yaml:3:1)");
  EXPECT_HAS(e, "HINT: did you mean training?");
  EXPECT_HAS(error_of(with_minimal("wandb:\n  project: x\n")),
             "HINT: valid sections here: job, model, data, training, optimizer, lr_scheduler, "
             "parallel, checkpoint, converters, logging");
}

TEST(Config, UnknownKeyInAnOverrideNamesTheOverride) {
  const std::string e = error_of(kMinimal, {"model.n_layer=3"});
  EXPECT_HAS(e, "unknown key model.n_layer (--set model.n_layer=3)");
  EXPECT_HAS(e, "did you mean model.n_layers?");
  EXPECT_HAS(error_of(kMinimal, {"modle.dim=3"}), "unknown section modle (--set modle.dim=3)");
}

TEST(Config, UnknownKeyInAConverterEntryIsNamedWithItsIndex) {
  const std::string e = error_of(with_minimal("converters:\n  - type: lora\n    rnak: 4\n"));
  EXPECT_HAS(e, "unknown key converters.0.rnak (job.yaml:5:5)");
  EXPECT_HAS(e, "did you mean converters.0.rank?");
}

TEST(Config, DuplicateKeyIsAnError) {
  EXPECT_HAS(error_of(with_minimal("model:\n  dim: 64\n  dim: 128\n")),
             "duplicate key model.dim (job.yaml:5:3)");
  EXPECT_HAS(error_of(with_minimal("model: {}\nmodel: {}\n")),
             "duplicate key model (job.yaml:4:1)");
}

// ---- wrong types ------------------------------------------------------------------------

TEST(Config, WrongTypesSayWhatWasExpected) {
  struct Case {
    std::string yaml, expected;
  } cases[] = {
      {"model:\n  dim: abc\n", "model.dim must be an integer, got 'abc' (job.yaml:4:3)"},
      {"model:\n  dim: 1.5\n", "model.dim must be an integer, got '1.5'"},
      {"model:\n  dim: 99999999999999999999\n", "model.dim must be an integer"},
      {"model:\n  dim: {a: 1}\n", "model.dim must be an integer, got '{a: 1}'"},
      {"model:\n  dim: null\n", "model.dim must be an integer, got 'null'"},
      {"optimizer:\n  lr: fast\n", "optimizer.lr must be a number, got 'fast'"},
      {"optimizer:\n  lr: .nan\n", "optimizer.lr must be a number, got '.nan'"},
      {"model:\n  tie_embeddings: maybe\n",
       "model.tie_embeddings must be true or false, got 'maybe'"},
      {"model:\n  tie_embeddings: yes\n", "model.tie_embeddings must be true or false, got 'yes'"},
      {"model:\n  tie_embeddings: 1\n", "model.tie_embeddings must be true or false, got '1'"},
      {"job:\n  name: [a, b]\n", "job.name must be a string, got '[a, b]'"},
      {"job:\n  run_dir: null\n", "job.run_dir must be a string, got 'null'"},
      {"model: 5\n", "model must be a mapping of keys, got '5' (job.yaml:3:1)"},
      {"parallel:\n  fsdp: [1]\n", "parallel.fsdp must be a mapping of keys, got '[1]'"},
      {"optimizer:\n  betas: 0.9\n", "optimizer.betas must be a list, got '0.9'"},
      {"optimizer:\n  betas: [0.9, x]\n", "optimizer.betas must be a number, got 'x'"},
      {"optimizer:\n  betas: [0.9, 0.95, 0.99]\n", "optimizer.betas must have 2 entries, got 3"},
      {"parallel:\n  threads_per_rank: many\n", "parallel.threads_per_rank must be an integer"},
      {"lr_scheduler:\n  decay: exponential\n",
       "lr_scheduler.decay = 'exponential' is not one of: cosine, linear, none"},
      {"converters: {type: lora}\n", "converters must be a list"},
      {"converters: [lora]\n", "converters.0 must be a mapping of keys, got 'lora'"},
      {"checkpoint:\n  additional_load_paths: x\n",
       "checkpoint.additional_load_paths must be a list"},
  };
  for (const Case& c : cases) EXPECT_HAS(error_of(with_minimal(c.yaml)), c.expected);
}

TEST(Config, QuotedNumbersAreStringsAndRejected) {
  const std::string e = error_of(with_minimal("model:\n  dim: \"128\"\n"));
  EXPECT_HAS(e, "model.dim must be an integer, got the string '128' (job.yaml:4:3)");
  EXPECT_HAS(e, "HINT: remove the quotes");
  EXPECT_HAS(error_of(kMinimal, {"model.tie_embeddings='true'"}),
             "model.tie_embeddings must be true or false, got the string 'true'");
  // ... while a string key takes a number as its text.
  EXPECT_EQ(parse(kMinimal, {"job.name=123"}).job.name, "123");
}

TEST(Config, NonMappingDocumentIsAnError) {
  EXPECT_HAS(error_of("just text\n"), "the config must be a mapping of sections");
  EXPECT_HAS(error_of("- a\n- b\n"), "the config must be a mapping of sections");
}

// ---- values -----------------------------------------------------------------------------

TEST(Config, CountsAndSizesMustBePositive) {
  for (const std::string key :
       {"model.vocab_size", "model.dim", "model.n_layers", "model.n_heads", "model.n_kv_heads",
        "model.multiple_of", "model.max_seq_len", "data.seq_len", "training.steps",
        "training.global_batch_size", "training.micro_batch_size", "training.eval_batches",
        "training.log_interval"}) {
    EXPECT_HAS(error_of(kMinimal, {key + "=0"}),
               key + " = 0 must be positive (--set " + key + "=0)");
    EXPECT_HAS(error_of(kMinimal, {key + "=-3"}), key + " = -3 must be positive");
  }
}

TEST(Config, OutOfRangeAndInconsistentValuesAreRejected) {
  struct Case {
    std::vector<std::string> overrides;
    std::string expected;
  } cases[] = {
      {{"model.n_heads=5"}, "model.n_heads = 5 does not divide model.dim = 128"},
      {{"model.n_kv_heads=3"}, "model.n_kv_heads = 3 does not divide model.n_heads = 4"},
      {{"model.dim=96", "model.n_heads=32", "model.n_kv_heads=1"}, "odd head dimension"},
      {{"data.seq_len=256"}, "data.seq_len = 256 exceeds model.max_seq_len = 128"},
      {{"training.global_batch_size=12"},
       "training.global_batch_size = 12 is not divisible by micro_batch_size 8 x 1 rank(s)"},
      {{"training.eval_interval=-5"}, "training.eval_interval must be >= 0"},
      {{"optimizer.lr=0"}, "optimizer.lr = 0 must be positive"},
      {{"optimizer.lr=-1e-3"}, "optimizer.lr = -0.001 must be positive"},
      {{"optimizer.betas=[0.9, 1.0]"}, "optimizer.betas entry 1 is outside [0, 1)"},
      {{"optimizer.betas=[-0.1, 0.9]"}, "optimizer.betas entry -0.1 is outside [0, 1)"},
      {{"optimizer.betas=[0.9]"}, "optimizer.betas must have 2 entries, got 1"},
      {{"optimizer.eps=0"}, "optimizer.eps = 0 must be positive"},
      {{"optimizer.weight_decay=-0.1"}, "optimizer.weight_decay must be >= 0"},
      {{"lr_scheduler.min_lr_ratio=1.5"}, "lr_scheduler.min_lr_ratio = 1.5 must be in [0, 1]"},
      {{"lr_scheduler.min_lr_ratio=-0.1"}, "lr_scheduler.min_lr_ratio = -0.1 must be in [0, 1]"},
      {{"lr_scheduler.warmup_steps=-1"}, "lr_scheduler.warmup_steps = -1 must be >= 0"},
      {{"model.norm_eps=0"}, "model.norm_eps = 0 must be positive"},
      {{"model.rope_theta=-1"}, "model.rope_theta = -1 must be positive"},
      {{"model.ffn_dim_multiplier=0"}, "model.ffn_dim_multiplier = 0 must be positive"},
      {{"logging.peak_tflops=-1"}, "logging.peak_tflops must be >= 0"},
      {{"parallel.threads_per_rank=0"},
       "parallel.threads_per_rank = 0 must be `auto` or a positive integer"},
      {{"model.name=gpt2"}, "model.name = 'gpt2' is not one of: llama"},
      {{"optimizer.name=sgd"}, "optimizer.name = 'sgd' is not one of: adamw"},
      {{"parallel.fsdp.mixed_precision.param_dtype=int8"},
       "parallel.fsdp.mixed_precision.param_dtype = 'int8' is not one of: float32, bfloat16"},
      {{"parallel.fsdp.mixed_precision.reduce_dtype=float16"},
       "parallel.fsdp.mixed_precision.reduce_dtype = 'float16' is not one of: float32, bfloat16"},
      {{"parallel.mixed_precision.param_dtype=bfloat16"},
       "unknown key parallel.mixed_precision (--set parallel.mixed_precision.param_dtype=bfloat16)"
       "\nHINT: it moved: use parallel.fsdp.mixed_precision (same keys)"},
      {{"parallel.device=gpu"}, "parallel.device = 'gpu' is not one of: auto, cpu, cuda"},
      {{"parallel.fsdp.enabled=false", "parallel.fsdp.mixed_precision.param_dtype=bfloat16"},
       "parallel.fsdp.mixed_precision = {param_dtype: bfloat16, reduce_dtype: float32} needs "
       "parallel.fsdp.enabled: true"},
      {{"parallel.device=cpu", "parallel.backend=nccl"},
       "parallel.backend = nccl needs CUDA tensors, but parallel.device is cpu"},
      {{"parallel.device=cuda", "parallel.backend=mpi"},
       "parallel.backend = mpi moves CPU tensors, but parallel.device is cuda"},
      {{"checkpoint.export_dtype=half"}, "checkpoint.export_dtype = 'half' is not one of"},
      {{"parallel.fsdp.activation_checkpointing=selective"},
       "parallel.fsdp.activation_checkpointing = 'selective' is not one of: auto, full, none"},
      {{"parallel.backend=gloo"}, "parallel.backend = 'gloo' is not one of: auto, mpi, nccl"},
      {{"parallel.fsdp.shard_group_size=0"},
       "parallel.fsdp.shard_group_size = '0' must be world, node or a positive number of ranks"},
      {{"parallel.fsdp.shard_group_size=-2"}, "parallel.fsdp.shard_group_size = '-2' must be"},
      {{"parallel.fsdp.shard_group_size=nodes"}, "parallel.fsdp.shard_group_size = 'nodes' must"},
      {{"parallel.fsdp.shard_group_size=node", "parallel.fsdp.enabled=false"},
       "parallel.fsdp.shard_group_size = node needs parallel.fsdp.enabled: true"},
  };
  for (const Case& c : cases) EXPECT_HAS(error_of(kMinimal, c.overrides), c.expected);
}

TEST(Config, ShardGroupSizeIsWorldNodeOrANumber) {
  EXPECT_EQ(parse(kMinimal).parallel.fsdp.shard_group_size, "world");
  EXPECT_EQ(parse(with_minimal("parallel: {fsdp: {shard_group_size: node}}"))
                .parallel.fsdp.shard_group_size,
            "node");
  // A YAML integer, in the file or as an override.
  EXPECT_EQ(
      parse(with_minimal("parallel: {fsdp: {shard_group_size: 8}}")).parallel.fsdp.shard_group_size,
      "8");
  EXPECT_EQ(parse(kMinimal, {"parallel.fsdp.shard_group_size=2"}).parallel.fsdp.shard_group_size,
            "2");
}

TEST(Config, WarmupMayOutlastAShortRun) {
  // A quick `--set training.steps=3` must not need a matching warmup override.
  EXPECT_EQ(parse(kMinimal, {"training.steps=3"}).lr_scheduler.warmup_steps, 20);
}

TEST(Config, GlobalBatchMustSplitOverRanks) {
  EXPECT_NO_THROW(parse(kMinimal, {}, 2));  // 16 = 8 x 1 x 2
  EXPECT_NO_THROW(parse(kMinimal, {"training.global_batch_size=24"}, 3));
  EXPECT_NO_THROW(parse(kMinimal, {"training.micro_batch_size=2"}, 4));  // 2 accumulation steps
  const std::string e = error_of(kMinimal, {}, 4);
  EXPECT_HAS(
      e, "training.global_batch_size = 16 is not divisible by micro_batch_size 8 x 4 rank(s) = 32");
  EXPECT_HAS(e, "HINT: global_batch_size = micro_batch_size x gradient accumulation steps x ranks");
  EXPECT_HAS(error_of(kMinimal, {"training.global_batch_size=16"}, 3),
             "(--set training.global_batch_size=16)");
}

TEST(Config, WorldSizeBelowOneIsAnError) {
  EXPECT_HAS(error_of(kMinimal, {}, 0), "world size 0");
}

TEST(Config, CrossFieldErrorsPointAtTheYamlLine) {
  const std::string e = error_of("data:\n  train: x\nmodel:\n  dim: 128\n  n_heads: 6\n");
  EXPECT_HAS(e, "model.n_heads = 6 does not divide model.dim = 128 (job.yaml:5:3)");
  EXPECT_HAS(e, "HINT: ");
}

TEST(Config, MissingRequiredKeyIsNamed) {
  const std::string e = error_of("model:\n  dim: 64\n");
  EXPECT_HAS(e, "config error: missing required key data.train (job.yaml)");
  EXPECT_HAS(e, "HINT: add `data.train:` to the config or pass --set data.train=...");
  EXPECT_HAS(error_of("job: {}\ndata:\n  val: v.bin\n"),
             "missing required key data.train (job.yaml:2:1)");
  EXPECT_HAS(error_of("job: {}\ndata:\n"), "missing required key data.train (job.yaml:2:1)");
  EXPECT_HAS(error_of(with_minimal("converters:\n  - rank: 4\n")),
             "missing required key converters.0.type (job.yaml:4:5)");
  EXPECT_HAS(error_of(kMinimal, {"data.train=null"}), "data.train must be a string, got 'null'");
}

TEST(Config, DeviceBackendAndMixedPrecisionValuesParse) {
  const Config c = parse(kMinimal, {"parallel.device=cuda", "parallel.backend=nccl",
                                    "parallel.fsdp.mixed_precision.param_dtype=bfloat16",
                                    "parallel.fsdp.mixed_precision.reduce_dtype=bfloat16"});
  EXPECT_EQ(c.parallel.device, "cuda");
  EXPECT_EQ(c.parallel.backend, "nccl");
  EXPECT_EQ(c.parallel.fsdp.mixed_precision.param_dtype, "bfloat16");
  EXPECT_EQ(c.parallel.fsdp.mixed_precision.reduce_dtype, "bfloat16");
  EXPECT_NO_THROW(parse(kMinimal, {"checkpoint.enable=false", "checkpoint.last_save_in_hf=true",
                                   "checkpoint.additional_load_paths=[]", "converters=[]",
                                   "parallel.backend=mpi", "parallel.device=cpu"}));
}

TEST(Config, CheckpointValuesAreChecked) {
  EXPECT_HAS(error_of(kMinimal, {"checkpoint.exclude_from_loading=[optimizer, model]"}),
             "checkpoint.exclude_from_loading = 'model' is not one of: optimizer, lr_scheduler, "
             "dataloader, rng (--set checkpoint.exclude_from_loading=[optimizer, model])");
  EXPECT_HAS(error_of(kMinimal, {"checkpoint.keep_latest_k=-1"}),
             "checkpoint.keep_latest_k = -1 must be >= 0 (0 keeps every checkpoint)");
  EXPECT_HAS(error_of(kMinimal, {"checkpoint.load_step=-3"}),
             "checkpoint.load_step = -3 must be >= 0");
  EXPECT_HAS(error_of(kMinimal, {"checkpoint.load_step=x"}),
             "checkpoint.load_step must be an integer");
  EXPECT_HAS(error_of(kMinimal, {"checkpoint.async_mode=background"}),
             "checkpoint.async_mode = 'background' is not one of: disabled, async");
  EXPECT_HAS(error_of(kMinimal, {"checkpoint.model_only=maybe"}),
             "checkpoint.model_only must be true or false");
  EXPECT_EQ(parse(kMinimal, {"checkpoint.keep_latest_k=0"}).checkpoint.keep_latest_k, 0);
  EXPECT_HAS(error_of(kMinimal, {"checkpoint.hf_max_shard_size=5XB"}),
             "checkpoint.hf_max_shard_size = '5XB' is not a size: unknown unit 'XB'");
  EXPECT_HAS(error_of(kMinimal, {"checkpoint.hf_max_shard_size=big"}),
             "checkpoint.hf_max_shard_size = 'big' is not a size");
  EXPECT_HAS(error_of(kMinimal, {"checkpoint.hf_max_keep=-1"}),
             "checkpoint.hf_max_keep = -1 must be >= 0");
  EXPECT_EQ(parse(kMinimal, {"checkpoint.hf_max_shard_size=500MB"}).checkpoint.hf_max_shard_size,
            "500MB");
  EXPECT_EQ(parse(kMinimal, {"checkpoint.resume_path=runs/x"}).checkpoint.resume_path, "runs/x");
}

TEST(Config, DisabledCheckpointKeysAreStillChecked) {
  EXPECT_HAS(error_of(kMinimal, {"checkpoint.interval=abc"}),
             "checkpoint.interval must be an integer");
  EXPECT_HAS(error_of(kMinimal, {"checkpoint.interval=0"}),
             "checkpoint.interval = 0 must be positive");
  EXPECT_HAS(error_of(kMinimal, {"checkpoint.last_save_in_hf=2"}),
             "checkpoint.last_save_in_hf must be true or false");
  const Config c = parse(kMinimal, {"checkpoint.enable=false", "checkpoint.interval=50",
                                    "checkpoint.exclude_from_loading=[lr_scheduler]"});
  EXPECT_EQ(c.checkpoint.interval, 50);
}

TEST(Config, ConverterEntriesAreChecked) {
  EXPECT_HAS(error_of(kMinimal, {"converters=[{type: lora, rank: x}]"}),
             "converters.0.rank must be an integer");
  EXPECT_HAS(error_of(kMinimal, {"converters=[{type: prune}]"}),
             "converters.0.type = 'prune' is not one of: lora");
  EXPECT_HAS(error_of(kMinimal, {"converters=[{type: lora, target_modules: wq}]"}),
             "converters.0.target_modules must be a list");
  EXPECT_HAS(error_of(kMinimal, {"converters=[{type: lora, export: fused}]"}),
             "converters.0.export = 'fused' is not one of");
  const Config c =
      parse(with_minimal("converters:\n  - type: lora\n    rank: 4\n    export: merged\n"
                         "  - {type: int8_qat, target_modules: [w1, w2, w3]}\n"));
  ASSERT_EQ(c.converters.size(), 2u);
  EXPECT_EQ(c.converters[0].export_mode, "merged");
  EXPECT_EQ(c.converters[0].target_modules, (std::vector<std::string>{"wq", "wv"}));
  EXPECT_EQ(c.converters[1].type, "int8_qat");
}

// ---- errors from YAML and files ---------------------------------------------------------

TEST(Config, YamlSyntaxErrorNamesTheLine) {
  const std::string e = error_of("data:\n  train: x\nmodel: dim: 4\n");
  EXPECT_HAS(e, "config error: invalid YAML: ");
  EXPECT_HAS(e, "(job.yaml:3:");
}

TEST(Config, MissingFileIsNamed) {
  try {
    load_config("/nonexistent/strata.yaml", {});
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_HAS(e.what(),
               "config error: cannot read the config file: No such file or directory "
               "(/nonexistent/strata.yaml)");
    EXPECT_HAS(e.what(), "HINT: check the path given to --config");
  }
}

TEST(Config, EveryMessageHasTheDocumentedShape) {
  for (const std::string& e :
       {error_of(kMinimal, {"model.dim=x"}), error_of(with_minimal("modle: {}\n")),
        error_of(kMinimal, {"training.steps=0"}), error_of("a: [\n")}) {
    EXPECT_EQ(e.rfind("config error: ", 0), 0u) << e;
    const std::string first_line = e.substr(0, e.find('\n'));
    EXPECT_EQ(first_line.back(), ')') << e;
    if (e.find('\n') != std::string::npos) {
      EXPECT_HAS(e.substr(e.find('\n')), "\nHINT: ");
    }
  }
}

// ---- writing ----------------------------------------------------------------------------

TEST(Config, ResolvedYamlRoundTrips) {
  const Config original =
      parse(kMinimal,
            {"model.ffn_dim_multiplier=1.3", "job.name='a: b \"c\"'", "model.norm_eps=1e-05",
             "model.rope_theta=500000", "data.val=v_*.bin", "optimizer.weight_decay=0",
             "optimizer.lr=0.1", "optimizer.eps=1e-300", "parallel.threads_per_rank=2",
             "job.run_dir=123", "training.grad_clip=0.3333333333333333",
             "lr_scheduler.decay=linear", "model.tie_embeddings=true",
             "checkpoint.exclude_from_loading=[rng, \"lr_scheduler\"]", "checkpoint.load_step=7"});
  const std::string yaml = to_yaml(original);
  const Config again = parse(yaml);
  EXPECT_EQ(to_yaml(again), yaml);
  EXPECT_EQ(again.job.name, "a: b \"c\"");
  EXPECT_EQ(again.job.run_dir, "123");
  EXPECT_EQ(*again.model.ffn_dim_multiplier, 1.3);
  EXPECT_EQ(again.model.norm_eps, 1e-05);
  EXPECT_EQ(again.model.rope_theta, 500000.0);
  EXPECT_EQ(again.optimizer.lr, 0.1);
  EXPECT_EQ(again.optimizer.eps, 1e-300);
  EXPECT_EQ(again.training.grad_clip, original.training.grad_clip);  // bit for bit
  EXPECT_EQ(again.optimizer.betas, original.optimizer.betas);
  EXPECT_EQ(again.lr_scheduler.decay, LrDecay::kLinear);
  EXPECT_TRUE(again.model.tie_embeddings);
  EXPECT_EQ(*again.data.val, "v_*.bin");
  EXPECT_FALSE(again.data.tokenizer.has_value());
  EXPECT_EQ(again.parallel.threads_per_rank, 2);
  EXPECT_EQ(again.checkpoint.exclude_from_loading,
            (std::vector<std::string>{"rng", "lr_scheduler"}));
  EXPECT_EQ(again.checkpoint.load_step, 7);
}

TEST(Config, ResolvedYamlWritesFloatsAsFloatsAndNullsAsNull) {
  const std::string yaml =
      to_yaml(parse(kMinimal, {"model.norm_eps=1e-05", "model.rope_theta=500000"}));
  for (const char* line :
       {"norm_eps: 1.0e-05\n", "rope_theta: 500000.0\n", "weight_decay: 0.1\n", "grad_clip: 1.0\n",
        "min_lr_ratio: 0.1\n", "peak_tflops: 0.0\n", "eps: 1.0e-08\n", "lr: 0.003\n",
        "betas: [0.9, 0.95]\n", "ffn_dim_multiplier: null\n", "val: null\n", "tokenizer: null\n",
        "resume_path: null\n", "threads_per_rank: auto\n", "decay: cosine\n",
        "additional_load_paths: []\n", "converters: []\n", "train: \"data/train_*.bin\"\n"}) {
    EXPECT_HAS(yaml, line);
  }
}

TEST(Config, ResolvedYamlHasEveryKeyInSchemaOrder) {
  const std::string yaml = to_yaml(parse(kMinimal));
  size_t at = 0;
  for (const char* key : {"job:\n  name:",
                          "  seed:",
                          "model:\n  name:",
                          "  tie_embeddings:",
                          "data:\n  train:",
                          "  seq_len:",
                          "training:\n  steps:",
                          "  log_interval:",
                          "optimizer:\n  name:",
                          "  weight_decay:",
                          "lr_scheduler:\n  warmup_steps:",
                          "parallel:\n  device:",
                          "  backend:",
                          "  fsdp:\n    enabled:",
                          "    mixed_precision:\n      param_dtype:",
                          "checkpoint:\n  enable:",
                          "  exclude_from_loading:",
                          "converters:",
                          "logging:\n  metrics_file:",
                          "  peak_tflops:"}) {
    const size_t found = yaml.find(key, at);
    ASSERT_NE(found, std::string::npos) << key << " missing after offset " << at << " in\n" << yaml;
    at = found;
  }
}

TEST(Config, ResolvedYamlQuotesStringsThatWouldReadAsSomethingElse) {
  const Config original =
      parse(kMinimal, {"data.val='Null'", "job.name='yes'", "job.run_dir=\"two\\nlines\\ttab\"",
                       "checkpoint.folder=''", "logging.metrics_file='#m: x'"});
  const std::string yaml = to_yaml(original);
  EXPECT_HAS(yaml, "val: \"Null\"\n");
  const Config again = parse(yaml);
  EXPECT_EQ(*again.data.val, "Null");
  EXPECT_EQ(again.job.name, "yes");
  EXPECT_EQ(again.job.run_dir, "two\nlines\ttab");
  EXPECT_EQ(again.checkpoint.folder, "");
  EXPECT_EQ(again.logging.metrics_file, "#m: x");
}

TEST(Config, ConvertersAreWrittenAsABlockListThatReadsBack) {
  Config c = parse(kMinimal);
  ConverterConfig lora;
  lora.type = "lora";
  lora.rank = 4;
  lora.alpha = 8.0;
  lora.dropout = 0.1;
  lora.target_modules = {"wq", "wk"};
  lora.export_mode = "merged";
  lora.save = "adapter_only";
  c.converters.push_back(lora);
  const std::string yaml = to_yaml(c);
  EXPECT_HAS(yaml,
             "converters:\n  - type: lora\n    rank: 4\n    alpha: 8.0\n    dropout: 0.1\n"
             "    use_rslora: false\n    target_modules: [wq, wk]\n    export: merged\n    save: "
             "adapter_only\nlogging:");
  const Config again = parse(yaml);
  ASSERT_EQ(again.converters.size(), 1u);
  EXPECT_EQ(again.converters[0].rank, 4);
  EXPECT_EQ(again.converters[0].target_modules, (std::vector<std::string>{"wq", "wk"}));
  EXPECT_EQ(again.converters[0].save, "adapter_only");
}

// ---- model arithmetic -------------------------------------------------------------------

TEST(Config, FfnHiddenDimFollowsMetasFormula) {
  ModelConfig m;
  m.dim = 4096;
  m.multiple_of = 256;
  EXPECT_EQ(m.ffn_hidden_dim(), 11008);  // Llama-2 7B
  m.dim = 128;
  m.multiple_of = 64;
  EXPECT_EQ(m.ffn_hidden_dim(), 384);  // the default micro model
  m.dim = 4096;
  m.multiple_of = 1024;
  m.ffn_dim_multiplier = 1.3;
  EXPECT_EQ(m.ffn_hidden_dim(), 14336);  // Llama-3 8B
  m.dim = 2048;
  m.multiple_of = 256;
  m.ffn_dim_multiplier = 1.5;
  EXPECT_EQ(m.ffn_hidden_dim(), 8192);  // Llama-3.2 1B
}

}  // namespace
}  // namespace strata
