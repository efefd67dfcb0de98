// strata: the one binary. Subcommands: train, prepare-data, inspect. Errors of any kind end here:
// one message on every rank (rank-prefixed when there are several), exit code 1.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cstdio>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "checkpoint/checkpoint_manager.h"
#include "parallel/process_group.h"
#include "trainer/config.h"
#include "trainer/prepare_data.h"
#include "trainer/train.h"

namespace {

struct TrainArgs {
  std::string config_path;
  std::vector<std::string> overrides;
  bool print_config = false;
};

int run_train(const TrainArgs& args, int* argc, char*** argv,
              std::unique_ptr<strata::ProcessGroup>& group) {
  group = std::make_unique<strata::ProcessGroup>(argc, argv);
  const strata::Config config =
      strata::load_config(args.config_path, args.overrides, group->world_size());
  if (args.print_config) {
    if (group->is_main()) fmt::print("{}", strata::to_yaml(config));
    return 0;
  }
  strata::train(config, *group);
  return 0;
}

int run_prepare_data(const strata::PrepareDataOptions& options) {
  const strata::PrepareDataResult r = strata::prepare_data(options);
  fmt::print(
      "prepare-data: {} documents -> train {} tokens in {} shard(s), val {} tokens in {} "
      "shard(s)\n"
      "  tokenizer  {} (vocab {})\n"
      "  unigram entropy of train tokens: {:.4f} nats/token\n"
      "  output     {}\n",
      r.documents, r.train_tokens, r.train_shards.size(), r.val_tokens, r.val_shards.size(),
      r.tokenizer_path, r.vocab_size, r.unigram_entropy_nats, options.out_dir);
  return 0;
}

// Lists a checkpoint (a step directory, or a folder's latest); with `verify`, recomputes every
// file's checksums. Exit 1 when a file does not match.
int run_inspect(const std::string& path, bool verify) {
  const std::optional<std::string> dir = strata::find_checkpoint(path);
  if (!dir) {
    throw strata::CheckpointError(fmt::format("{} holds no committed checkpoint\nHINT: give a "
                                              "step-NNNNNNN directory or a checkpoint folder "
                                              "with one",
                                              path));
  }
  const strata::CheckpointReader reader(*dir);
  fmt::print("{}", strata::describe_checkpoint(reader));
  if (!verify) return 0;
  const std::vector<std::string> problems = reader.verify_files();
  if (!problems.empty()) {
    throw strata::CheckpointError(fmt::format("checkpoint {} failed verification:\n  {}\nHINT: "
                                              "resume from another step "
                                              "(checkpoint.load_step)",
                                              *dir, fmt::join(problems, "\n  ")));
  }
  fmt::print("verify: all {} file(s) match their size, SHA-256 and block checksums\n",
             reader.metadata().at("files").size());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"strata: a distributed trainer for Llama-family language models.\n"
               "Launch alone, or with mpirun / srun for several ranks."};
  app.require_subcommand(1);
  app.set_version_flag("--version", "strata 0.1.0");

  TrainArgs train_args;
  CLI::App* train = app.add_subcommand("train", "Train a model from a YAML config.");
  train->add_option("--config", train_args.config_path, "YAML config file (see configs/)")
      ->required()
      ->check(CLI::ExistingFile);
  train->add_option("--set", train_args.overrides,
                    "Override a config key: --set key.path=value (repeatable; the value is YAML, "
                    "e.g. --set training.steps=50 --set optimizer.betas=[0.9,0.99])")
      ->allow_extra_args(false);  // one value per --set: values may contain spaces
  train->add_flag("--print-config", train_args.print_config,
                  "Print the resolved config (YAML) and exit");

  strata::PrepareDataOptions prep;
  std::string tokenizer_path;
  std::string separator;
  CLI::App* prepare = app.add_subcommand(
      "prepare-data",
      "Tokenize text files into llm.c-format train/val shards, training a SentencePiece "
      "tokenizer unless one is given.");
  prepare->add_option("--input", prep.inputs, "Text files, directories or glob patterns")
      ->required()
      ->expected(1, -1);
  prepare->add_option("--out", prep.out_dir, "Output directory")->required();
  auto* tok_opt = prepare->add_option("--tokenizer", tokenizer_path,
                                      "Reuse this SentencePiece tokenizer.model");
  prepare->add_option("--vocab-size", prep.vocab_size, "Vocabulary size of a trained tokenizer")
      ->capture_default_str()
      ->excludes(tok_opt);
  prepare->add_option("--val-fraction", prep.val_fraction,
                      "Fraction of documents held out for validation")
      ->capture_default_str();
  prepare->add_option("--separator", separator,
                      "A line equal to this separates documents (e.g. % for fortune files)");
  prepare->add_option("--shard-tokens", prep.shard_tokens, "Maximum tokens per shard file")
      ->capture_default_str();
  prepare->add_option("--seed", prep.seed, "Seed of the train/val split")->capture_default_str();

  std::string inspect_path;
  bool inspect_verify = false;
  CLI::App* inspect = app.add_subcommand(
      "inspect", "List a checkpoint's tensors, files and checksums (a step directory, or a "
                 "checkpoint folder: its latest).");
  inspect->add_option("path", inspect_path, "Checkpoint step directory or folder")->required();
  inspect->add_flag("--verify", inspect_verify,
                    "Recompute every file's SHA-256 and block checksums and compare");

  // Help and usage errors are CLI11's; they happen before MPI starts.
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  // `group` outlives the error report so that MPI is still up when every rank prints.
  std::unique_ptr<strata::ProcessGroup> group;
  try {
    if (*train) {
      return run_train(train_args, &argc, &argv, group);
    }
    if (*inspect) return run_inspect(inspect_path, inspect_verify);
    if (!tokenizer_path.empty()) prep.tokenizer = tokenizer_path;
    if (!separator.empty()) prep.separator = separator;
    return run_prepare_data(prep);
  } catch (const std::exception& e) {
    const std::string prefix =
        group && group->world_size() > 1 ? fmt::format("[rank {}] ", group->rank()) : "";
    std::fflush(stdout);
    fmt::print(stderr, "{}error: {}\n", prefix, e.what());
    return 1;
  }
}
