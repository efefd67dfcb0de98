// `strata prepare-data`: text files -> SentencePiece tokenizer (trained or reused) ->
// llm.c-format train/val token shards, plus meta.json (counts and unigram entropy).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "trainer/data/instruction_data.h"

namespace strata {

struct PrepareDataOptions {
  std::vector<std::string> inputs;  // files, directories (recursed), or globs
  std::string out_dir;
  std::optional<std::string> tokenizer;  // reuse this tokenizer.model instead of training
  int64_t vocab_size = 2048;             // when training a tokenizer
  double val_fraction = 0.05;            // share of documents that go to val
  std::optional<std::string> separator;  // a line equal to this splits documents
  int64_t shard_tokens = 100'000'000;    // max tokens per shard file
  uint64_t seed = 1234;                  // train/val split
  // "text": documents, every token a target. "jsonl": instruction records
  // (trainer/data/instruction_data.h) with loss masks, packed into windows of seq_len + 1;
  // needs `tokenizer` and `seq_len`.
  std::string format = "text";
  std::optional<std::string> chat_template;  // a template file or a tokenizer_config.json
  int64_t seq_len = 0;
  std::string overlong = "truncate";  // jsonl records longer than a window: truncate | drop
};

struct PrepareDataResult {
  int64_t documents = 0;
  int64_t train_tokens = 0;
  int64_t val_tokens = 0;
  int64_t vocab_size = 0;
  double unigram_entropy_nats = 0.0;  // of the train tokens
  std::vector<std::string> train_shards;
  std::vector<std::string> val_shards;
  std::string tokenizer_path;
  int64_t input_files = 0;    // text files read
  int64_t skipped_files = 0;  // binary, .dat, hidden or duplicate files not read
  // jsonl: the packing of each split, the records without a target token (left out), and
  // where the chat template came from.
  PackingStats train_packing, val_packing;
  int64_t records_without_targets = 0;
  std::string chat_template;
};

PrepareDataResult prepare_data(const PrepareDataOptions& options);

}  // namespace strata
