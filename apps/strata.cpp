// strata: the one binary. Subcommands: train, prepare-data, eval, generate, convert, inspect,
// tokenize.
// Errors of any kind end here: one message on every rank (rank-prefixed when there are
// several), exit code 1. Built a second time with STRATA_FAULT_INJECTION for the test suite
// (tests/common/fault_injection.h): that binary alone reads fault-injection variables.
#include <ATen/ATen.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <torch/version.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <atomic>
#include <exception>
#include <fstream>
#include <iostream>
#include <sstream>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/checkpoint_manager.h"
#include "checkpoint/file_io.h"
#include "checkpoint/hub/download.h"
#include "parallel/communicator.h"
#include "parallel/nccl_communicator.h"
#include "parallel/process_group.h"
#include "trainer/config/config.h"
#include "trainer/data/chat_template.h"
#include "trainer/data/data_loader.h"
#include "trainer/data/prepare_data.h"
#include "trainer/data/tokenizer.h"
#include "trainer/evaluate.h"
#include "trainer/kernels/blas.h"
#include "trainer/model/converters/peft.h"
#include "trainer/model/generate.h"
#include "trainer/model/hf_io.h"
#include "trainer/resume.h"
#include "trainer/state_pieces.h"
#include "trainer/train.h"
#include "trainer/train_state.h"
#include "trainer/weight_sources.h"
#ifdef STRATA_FAULT_INJECTION
#include "tests/common/fault_injection.h"
#endif

namespace {

// `strata --version`: the LibTorch it runs on, its CUDA side (runtime, cuDNN, NCCL, visible GPUs)
// and its BLAS.
std::string version_text() {
  std::string torch_line = fmt::format("LibTorch {}", TORCH_VERSION);
  if (strata::nccl_compiled()) {
    torch_line += ", built with CUDA";
    try {
      const long cudnn = at::detail::getCUDAHooks().versionCuDNN();
      torch_line +=
          fmt::format(" (cuDNN {}.{}.{})", cudnn / 10000, cudnn % 10000 / 100, cudnn % 100);
    } catch (const std::exception&) {
    }
  } else {
    torch_line += ", CPU only";
  }
  return fmt::format("strata {}\n{}\nCUDA: {}\nBLAS: {}", "0.1.0", torch_line,
                     strata::cuda_description(), strata::blas_description());
}

// A tokenizer as the user gave it (--tokenizer, a chat template's tokenizer_config.json): a
// local path unchanged, a Hub spec the snapshot directory of its tokenizer files alone (progress
// on stderr, so that stdout carries only the command's own output).
std::string local_tokenizer(const std::string& path) {
  return strata::resolve_tokenizer_path(path, nullptr, [](const std::string& line) {
    fmt::print(stderr, "{}\n", line);
    std::fflush(stderr);
  });
}

struct TrainArgs {
  std::string config_path;
  std::vector<std::string> overrides;
  bool print_config = false;
};

int run_train(const TrainArgs& args, int* argc, char*** argv,
              std::unique_ptr<strata::ProcessGroup>& group) {
  group = std::make_unique<strata::ProcessGroup>(argc, argv);
  strata::Config config =
      strata::load_config(args.config_path, args.overrides, group->world_size());
  // Hub specs among the load paths: one rank per node fills the HF cache, every rank agrees.
  const int rank = group->rank();
  const strata::HubLog hub_log = [rank](const std::string& line) {
    fmt::print("{}{}\n", rank == 0 ? "" : fmt::format("[rank {}] ", rank), line);
    std::fflush(stdout);
  };
  strata::TrainOptions options;
  options.local_dirs = strata::resolve_load_paths(config.checkpoint, [&](const std::string& path) {
    return strata::resolve_model_path(path, group.get(), hub_log);
  });
  // No model keys: the model is the one in the config.json of resume_path (an HF directory,
  // or the base of a PEFT adapter).
  std::optional<std::string> shape_dir;
  if (config.checkpoint.resume_path) {
    const std::map<std::string, std::string>& local_dirs = options.local_dirs;
    const std::string dir = local_dirs.at(*config.checkpoint.resume_path);
    if (strata::is_peft_adapter_dir(dir)) {
      const std::string base = strata::peft_base(dir);
      if (local_dirs.count(base) && strata::is_hf_model_dir(local_dirs.at(base)))
        shape_dir = local_dirs.at(base);
    } else if (strata::is_hf_model_dir(dir)) {
      shape_dir = dir;
    }
  }
  if (shape_dir && !strata::config_sets_model(args.config_path, args.overrides)) {
    const strata::ModelConfig model = strata::hf_model_config(*shape_dir);
    config = strata::load_config(args.config_path, args.overrides, group->world_size(), &model);
    if (group->is_main())
      fmt::print("model: from {}/config.json (the config sets no model keys)\n", *shape_dir);
  }
  if (args.print_config) {
    if (group->is_main()) fmt::print("{}", strata::to_yaml(config));
    return 0;
  }
  // data.tokenizer as a Hub spec: its tokenizer files only, resolved as the load paths are.
  if (config.data.tokenizer) {
    config.data.tokenizer =
        strata::resolve_tokenizer_path(*config.data.tokenizer, group.get(), hub_log);
  }
#ifdef STRATA_FAULT_INJECTION
  options.before_checkpoint_write = strata::testing::fault_injection_from_environment();
#endif
  strata::train(config, *group, options);
  return 0;
}

// `strata chat-template`: one conversation rendered with a chat template, printed exactly (no
// newline added). --template is a Jinja file, or a tokenizer_config.json (or a directory or Hub
// spec holding one) whose chat_template and bos/eos tokens are used.
struct ChatTemplateArgs {
  std::string template_path, messages_path;
  bool add_generation_prompt = false;
  std::optional<std::string> bos_token, eos_token;
};

int run_chat_template(const ChatTemplateArgs& args) {
  auto read_file = [](const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw strata::DataError(fmt::format("cannot read {}", path));
    std::ostringstream all;
    all << in.rdbuf();
    return all.str();
  };
  // A Hub spec: the tokenizer_config.json of its tokenizer files.
  const std::string template_path = local_tokenizer(args.template_path);
  const std::filesystem::path path = template_path;
  strata::ChatTemplateSource source;
  if (std::filesystem::is_directory(path) || path.extension() == ".json") {
    source = strata::load_chat_template(template_path);
  } else {
    source.source = read_file(args.template_path);
    source.origin = args.template_path;
  }
  const strata::ChatTemplate chat_template(source.source, source.origin);
  strata::ChatTemplateOptions options;
  options.bos_token = args.bos_token.value_or(source.bos_token);
  options.eos_token = args.eos_token.value_or(source.eos_token);
  options.add_generation_prompt = args.add_generation_prompt;
  const std::string text = chat_template.render(
      strata::parse_chat_messages(read_file(args.messages_path), args.messages_path), options);
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::fflush(stdout);
  return 0;
}

int run_prepare_data(const strata::PrepareDataOptions& options) {
  const strata::PrepareDataResult r = strata::prepare_data(options);
  if (options.format == "jsonl") {
    auto split = [](const char* name, const strata::PackingStats& s, size_t shards) {
      return fmt::format(
          "  {:<5}  {} records in {} windows of {} tokens ({} shard(s)); {:.1f}% of the tokens "
          "are targets, {:.1f}% padding; {} truncated, {} dropped (longer than a window)\n",
          name, s.records, s.windows, s.windows ? s.tokens / s.windows : 0, shards,
          s.tokens ? 100.0 * s.targets / s.tokens : 0.0,
          s.tokens ? 100.0 * s.padding / s.tokens : 0.0, s.truncated, s.dropped);
    };
    fmt::print(
        "prepare-data: {} records (jsonl) -> packed windows with loss masks\n{}{}"
        "  {} record(s) without a target token left out\n"
        "  tokenizer  {} (vocab {})\n"
        "  chat template {}\n"
        "  output     {}\n",
        r.documents, split("train", r.train_packing, r.train_shards.size()),
        split("val", r.val_packing, r.val_shards.size()), r.records_without_targets,
        r.tokenizer_path, r.vocab_size, r.chat_template.empty() ? "none" : r.chat_template,
        options.out_dir);
    return 0;
  }
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

struct EvalArgs {
  std::string from, data;
  int64_t seq_len = 0;  // 0: the model's max_seq_len
  bool seq_len_given = false;
  int64_t max_tokens = 0;
  bool skip_memory_check = false;
  bool document_masking = false;
};

int run_eval(const EvalArgs& args) {
  if (args.seq_len_given && args.seq_len <= 0) {
    throw strata::ConfigError(
        fmt::format("eval --seq-len {}: the window length must be a positive number of tokens\n"
                    "HINT: leave out --seq-len to use the model's max_seq_len, or pass a length "
                    "such as --seq-len 128",
                    args.seq_len));
  }
  if (args.max_tokens < 0) {
    throw strata::ConfigError(
        fmt::format("eval --max-tokens {}: the number of tokens to score must be >= 0\n"
                    "HINT: leave out --max-tokens (or pass 0) to score every window of --data",
                    args.max_tokens));
  }
  strata::InferenceWorkload workload;
  workload.batch = 8;  // evaluate's micro batch below
  workload.seq_len = args.seq_len;
  workload.seq_len_option = "--seq-len";
  workload.skip_check = args.skip_memory_check;
  const strata::ModelSource source = strata::load_model_source(args.from, workload);
  const int64_t seq_len = args.seq_len > 0 ? args.seq_len : source.config.max_seq_len;
  if (seq_len > source.config.max_seq_len) {
    throw strata::ConfigError(fmt::format("--seq-len {} exceeds the model's max_seq_len {}",
                                          seq_len, source.config.max_seq_len));
  }
  if (args.max_tokens > 0 && args.max_tokens < seq_len) {
    throw strata::ConfigError(fmt::format(
        "eval --max-tokens {} is less than one window of {} tokens: nothing would be scored\n"
        "HINT: pass --max-tokens {} or more, or a smaller --seq-len",
        args.max_tokens, seq_len, seq_len));
  }
  const strata::TokenDataset data(args.data, seq_len, source.config.vocab_size);
  if (args.document_masking && !data.has_documents()) {
    throw strata::DataError(fmt::format(
        "eval --document-masking: the shards matching '{}' do not mark where documents start: "
        "only packed instruction data does\nHINT: leave out --document-masking, or prepare the "
        "data with `strata prepare-data --format jsonl`",
        args.data));
  }
  const int64_t windows =
      args.max_tokens > 0 ? args.max_tokens / seq_len : data.num_sequential_windows();
  const auto [loss, tokens] = strata::evaluate(*source.model, data, windows, /*micro_batch=*/8,
                                               nullptr, args.document_masking);
  const int64_t scored = std::min(windows, data.num_sequential_windows());
  fmt::print("eval: {} on {} ({} windows of {} tokens{}{}): loss {:.6f}, perplexity {:.3f}\n",
             source.description, args.data, scored, seq_len,
             data.has_loss_mask() ? fmt::format(", {} target tokens by the loss mask", tokens)
                                  : std::string(),
             args.document_masking ? ", attention within each document" : "", loss, std::exp(loss));
  fmt::print("{}\n", nlohmann::json{{"loss", loss}, {"tokens", tokens}}.dump());
  return 0;
}

struct GenerateArgs {
  std::string from, prompt;
  std::string tokenizer;  // overrides the source's
  strata::SamplingOptions sampling;
  bool skip_memory_check = false;
};

int run_generate(GenerateArgs args) {
  const strata::SamplingOptions& s = args.sampling;
  if (s.max_new_tokens < 0) {
    throw strata::ConfigError(
        fmt::format("generate --max-new-tokens {}: the number of tokens to sample must be >= 0\n"
                    "HINT: pass e.g. --max-new-tokens 48",
                    s.max_new_tokens));
  }
  if (!std::isfinite(s.temperature) || s.temperature < 0) {
    throw strata::ConfigError(
        fmt::format("generate --temperature {}: the temperature must be a finite number >= 0\n"
                    "HINT: pass 0 for greedy decoding, or e.g. --temperature 0.8 to sample",
                    s.temperature));
  }
  if (s.top_k < 0) {
    throw strata::ConfigError(
        fmt::format("generate --top-k {}: k must be >= 0\n"
                    "HINT: pass 0 to sample among every token, or e.g. --top-k 40",
                    s.top_k));
  }
  // One sequence: BOS, the prompt (at most a token per byte, plus one) and the new tokens.
  strata::InferenceWorkload workload;
  workload.batch = 1;
  workload.seq_len = std::min<int64_t>(
      strata::kMaxModelSize,
      std::min<int64_t>(s.max_new_tokens, strata::kMaxModelSize) +
          static_cast<int64_t>(std::min<size_t>(args.prompt.size(), strata::kMaxModelSize)) + 2);
  workload.skip_check = args.skip_memory_check;
  const strata::ModelSource source = strata::load_model_source(args.from, workload);
  const std::string tokenizer_path =
      !args.tokenizer.empty() ? local_tokenizer(args.tokenizer) : source.tokenizer.value_or("");
  if (tokenizer_path.empty()) {
    throw strata::ConfigError(
        fmt::format("{} names no tokenizer that still exists\nHINT: pass "
                    "--tokenizer tokenizer.model",
                    source.description));
  }
  const strata::Tokenizer tokenizer(tokenizer_path);
  // Documents start with BOS, or (a tokenizer without one) follow the previous one's EOS.
  const int64_t start = tokenizer.bos_id() >= 0 ? tokenizer.bos_id() : tokenizer.eos_id();
  std::vector<int64_t> prompt;
  if (start >= 0) prompt.push_back(start);
  for (uint32_t id : tokenizer.encode(args.prompt)) prompt.push_back(id);
  if (prompt.empty()) {
    throw strata::ConfigError(
        fmt::format("generate: the prompt is empty and tokenizer {} has neither BOS nor EOS to "
                    "start from\nHINT: pass a non-empty --prompt",
                    tokenizer.path()));
  }
  args.sampling.stop_token = tokenizer.eos_id();
  const std::vector<int64_t> ids = strata::generate(*source.model, prompt, args.sampling);
  std::vector<int64_t> all(prompt.begin() + (start >= 0 ? 1 : 0), prompt.end());
  all.insert(all.end(), ids.begin(), ids.end());
  fmt::print("{}\n", tokenizer.decode(all));
  return 0;
}

struct ConvertArgs {
  std::string from, to_hf, to_strata, dtype = "float32";
  bool skip_memory_check = false;
};

int run_convert(const ConvertArgs& args, int* argc, char*** argv,
                std::unique_ptr<strata::ProcessGroup>& group) {
  namespace fs = std::filesystem;
  const std::string out = !args.to_hf.empty() ? args.to_hf : args.to_strata;
  if (fs::exists(out) && !fs::is_empty(out)) {
    throw strata::CheckpointError(
        fmt::format("{} exists and is not empty\nHINT: choose a new "
                    "output directory",
                    out));
  }
  strata::InferenceWorkload workload;  // no forward pass
  workload.skip_check = args.skip_memory_check;
  const strata::ModelSource source = strata::load_model_source(args.from, workload);
  strata::Config config;
  config.model = source.config;
  config.data.tokenizer = source.tokenizer;
  config.checkpoint.export_dtype = args.dtype;
  if (!args.to_hf.empty()) {
    std::optional<strata::Tokenizer> tokenizer;
    if (source.tokenizer) tokenizer.emplace(*source.tokenizer);
    const strata::CommitJob job =
        strata::hf_export_job(source.step, source.model.get(), nullptr, config,
                              tokenizer ? &*tokenizer : nullptr, 0, 1, true);
    // Written beside the target and renamed: a failed conversion leaves no half directory.
    const std::string temp = out + ".incomplete";
    fs::remove_all(temp);
    fs::create_directories(temp);
    job.finalize(temp, {job.write_rank(temp)});
    if (fs::exists(out)) fs::remove(out);
    strata::rename_durable(temp, out);
    fmt::print("convert: {} -> Hugging Face model {} ({})\n", source.description, out, args.dtype);
    return 0;
  }
  // A model-only Strata checkpoint: a checkpoint folder with one committed step directory.
  group = std::make_unique<strata::ProcessGroup>(argc, argv);
  std::unique_ptr<strata::Communicator> comm = strata::make_mpi_communicator(*group);
  strata::CheckpointOptions options;
  options.folder = out;
  strata::CheckpointManager manager(options, *comm,
                                    [](const std::string& line) { fmt::print("{}\n", line); });
  strata::SaveRequest request;
  request.step = source.step;
  request.model_only = true;
  request.pieces = strata::state_pieces(*source.model, nullptr, 0, 1, strata::PieceUse::kSave);
  const at::ScalarType dtype = strata::dtype_named(args.dtype);
  for (strata::TensorPiece& piece : request.pieces) piece.local = piece.local.to(dtype);
  request.metadata = {{"model", strata::model_config_json(source.config)},
                      {"converted_from", args.from}};
  strata::TrainState state;
  state.step = source.step;
  state.data_step_offset = source.step;  // a converted model: the data order starts afresh
  state.lr_step_offset = source.step;
  request.train_state = state.to_json({});
  request.config_yaml = strata::to_yaml(config);
  manager.save(std::move(request));
  fmt::print("convert: {} -> Strata checkpoint folder {} ({})\n", source.description, out,
             args.dtype);
  return 0;
}

struct TokenizeArgs {
  std::string tokenizer, input;
  bool add_special_tokens = false, decode = false;
  int threads = 0;     // > 0: encode chunks of lines on this many threads (a benchmark mode)
  bool count = false;  // print counts and the encoding time instead of the ids
  bool lines = false;  // JSON Lines: a text or a JSON array of ids per line, a result per line
};

std::string read_input(const std::string& path) {
  std::string text;
  if (path.empty() || path == "-") {
    std::ostringstream all;
    all << std::cin.rdbuf();
    return all.str();
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw strata::DataError(fmt::format("cannot read {}", path));
  std::ostringstream all;
  all << in.rdbuf();
  return all.str();
}

// `strata tokenize`: the ids of a text as one JSON array, or (--decode) the text of a JSON
// array of ids, written as it is.
int run_tokenize(const TokenizeArgs& args) {
  const strata::Tokenizer tokenizer(local_tokenizer(args.tokenizer));
  const std::string input = read_input(args.input);
  auto id_list = [](const nlohmann::json& ids) {
    if (!ids.is_array())
      throw strata::DataError("tokenize --decode: the input must be a JSON array");
    std::vector<int64_t> list;
    for (const nlohmann::json& id : ids) {
      if (!id.is_number_integer())
        throw strata::DataError(fmt::format("tokenize --decode: {} is not a token id", id.dump()));
      list.push_back(id.get<int64_t>());
    }
    return list;
  };
  if (args.lines) {
    std::istringstream in(input);
    for (std::string line; std::getline(in, line);) {
      if (line.empty()) continue;
      // A JSON array of ids is decoded; a string is encoded, or an object {"text": ...,
      // "add_special_tokens": ...}.
      const nlohmann::json item = nlohmann::json::parse(line);
      if (item.is_array()) {
        fmt::print("{}\n", nlohmann::json(tokenizer.decode(id_list(item))).dump());
      } else if (item.is_object()) {
        const bool special = item.value("add_special_tokens", args.add_special_tokens);
        fmt::print(
            "{}\n",
            nlohmann::json(tokenizer.encode(item.at("text").get<std::string>(), special)).dump());
      } else {
        fmt::print("{}\n", nlohmann::json(
                               tokenizer.encode(item.get<std::string>(), args.add_special_tokens))
                               .dump());
      }
    }
    return 0;
  }
  if (args.decode) {
    nlohmann::json ids;
    try {
      ids = nlohmann::json::parse(input);
    } catch (const nlohmann::json::exception& e) {
      throw strata::DataError(
          fmt::format("tokenize --decode: the input is not JSON: {}", e.what()));
    }
    const std::string text = tokenizer.decode(id_list(ids));
    std::fwrite(text.data(), 1, text.size(), stdout);
    return 0;
  }
  if (args.threads <= 0) {
    const auto begin = std::chrono::steady_clock::now();
    const std::vector<uint32_t> ids = tokenizer.encode(input, args.add_special_tokens);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
    if (args.count) {
      fmt::print(
          "{}\n",
          nlohmann::json{{"bytes", input.size()}, {"tokens", ids.size()}, {"seconds", seconds}}
              .dump());
    } else {
      fmt::print("{}\n", nlohmann::json(ids).dump());
    }
    return 0;
  }
  // Chunks of whole lines, encoded independently on `threads` threads.
  std::vector<std::pair<size_t, size_t>> chunks;
  const size_t target = std::max<size_t>(1 << 14, input.size() / (64 * args.threads) + 1);
  for (size_t begin = 0; begin < input.size();) {
    size_t end = std::min(input.size(), begin + target);
    const size_t newline = input.find('\n', end);
    end = newline == std::string::npos ? input.size() : newline + 1;
    chunks.push_back({begin, end});
    begin = end;
  }
  std::vector<std::vector<uint32_t>> out(chunks.size());
  std::atomic<size_t> next{0};
  const auto begin = std::chrono::steady_clock::now();
  std::vector<std::thread> workers;
  for (int t = 0; t < args.threads; ++t) {
    workers.emplace_back([&] {
      for (size_t i; (i = next++) < chunks.size();) {
        out[i] = tokenizer.encode(input.substr(chunks[i].first, chunks[i].second - chunks[i].first),
                                  args.add_special_tokens);
      }
    });
  }
  for (std::thread& w : workers) w.join();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
  std::vector<uint32_t> ids;
  for (const auto& chunk : out) ids.insert(ids.end(), chunk.begin(), chunk.end());
  if (args.count) {
    fmt::print("{}\n", nlohmann::json{{"bytes", input.size()},
                                      {"tokens", ids.size()},
                                      {"seconds", seconds},
                                      {"threads", args.threads},
                                      {"chunks", chunks.size()}}
                           .dump());
  } else {
    fmt::print("{}\n", nlohmann::json(ids).dump());
  }
  return 0;
}

// Lists a checkpoint (a step directory, or a folder's latest); with `verify`, recomputes every
// file's checksums. Exit 1 when a file does not match.
int run_inspect(const std::string& path, bool verify) {
  const std::optional<std::string> dir = strata::find_checkpoint(path);
  if (!dir) {
    throw strata::CheckpointError(
        fmt::format("{} holds no committed checkpoint\nHINT: give a "
                    "step-NNNNNNN directory or a checkpoint folder "
                    "with one",
                    path));
  }
  const strata::CheckpointReader reader(*dir);
  fmt::print("{}", strata::describe_checkpoint(reader));
  if (!verify) return 0;
  std::vector<std::string> problems = reader.verify_files();
  try {
    strata::TrainState::read(*dir, reader.step(), reader.model_only());
  } catch (const strata::CheckpointError& e) {
    const std::string message = e.what();
    problems.push_back(message.substr(0, message.find("\nHINT:")));
  }
  if (!problems.empty()) {
    throw strata::CheckpointError(
        fmt::format("checkpoint {} failed verification:\n  {}\nHINT: "
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
  CLI::App app{
      "strata: a distributed trainer for Llama-family language models.\n"
      "Launch alone, or with mpirun / srun for several ranks."};
  app.require_subcommand(1);
  app.set_version_flag("--version", [] { return version_text(); });

  TrainArgs train_args;
  CLI::App* train = app.add_subcommand("train", "Train a model from a YAML config.");
  train->add_option("--config", train_args.config_path, "YAML config file (see configs/)")
      ->required()
      ->check(CLI::ExistingFile);
  train
      ->add_option("--set", train_args.overrides,
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
  auto* tok_opt = prepare->add_option(
      "--tokenizer", tokenizer_path,
      "Use this tokenizer: a SentencePiece tokenizer.model, a Hugging Face tokenizer.json, a "
      "model directory holding tokenizer.json, or a Hub spec hf://owner/repo[/subdir][@rev] "
      "(only its tokenizer files are downloaded)");
  prepare->add_option("--vocab-size", prep.vocab_size, "Vocabulary size of a trained tokenizer")
      ->capture_default_str()
      ->excludes(tok_opt);
  prepare
      ->add_option("--val-fraction", prep.val_fraction,
                   "Fraction of documents held out for validation")
      ->capture_default_str();
  prepare->add_option("--separator", separator,
                      "A line equal to this separates documents (e.g. % for fortune files)");
  prepare->add_option("--shard-tokens", prep.shard_tokens, "Maximum tokens per shard file")
      ->capture_default_str();
  prepare->add_option("--seed", prep.seed, "Seed of the train/val split")->capture_default_str();
  std::string chat_template;
  prepare
      ->add_option("--format", prep.format,
                   "text: documents, every token a target; jsonl: instruction records "
                   "({\"text\"}, {\"prompt\", \"completion\"} or {\"messages\"}) with loss "
                   "masks, packed into windows of --seq-len + 1 (needs --tokenizer)")
      ->check(CLI::IsMember({"text", "jsonl"}))
      ->capture_default_str();
  prepare->add_option("--chat-template", chat_template,
                      "jsonl: the chat template for messages records (a Jinja file, a "
                      "tokenizer_config.json, or a Hub spec); default: the tokenizer's "
                      "tokenizer_config.json");
  prepare->add_option("--seq-len", prep.seq_len,
                      "jsonl: the run's data.seq_len (window length - 1)");
  prepare
      ->add_option("--overlong", prep.overlong,
                   "jsonl: a record longer than a window is cut to it (truncate) or left out "
                   "(drop)")
      ->check(CLI::IsMember({"truncate", "drop"}))
      ->capture_default_str();

  EvalArgs eval_args;
  CLI::App* eval = app.add_subcommand(
      "eval",
      "Mean token cross-entropy of a model on a token file: consecutive windows from the "
      "file start; the last line is JSON {\"loss\": .., \"tokens\": ..}.");
  eval->add_option("--from", eval_args.from,
                   "Strata checkpoint (folder or step dir) or HF model dir")
      ->required();
  eval->add_option("--data", eval_args.data, "Token file(s) in llm.c's .bin format (glob)")
      ->required();
  eval->add_option("--seq-len", eval_args.seq_len,
                   "Window length (default: the model's max_seq_len)");
  eval->add_option("--max-tokens", eval_args.max_tokens, "Score at most this many tokens (0: all)");
  eval->add_flag("--skip-memory-check", eval_args.skip_memory_check,
                 "Run even when the memory estimate exceeds the memory available");
  eval->add_flag("--document-masking", eval_args.document_masking,
                 "Attention within each packed document (as data.document_masking)");

  GenerateArgs gen_args;
  CLI::App* gen = app.add_subcommand("generate", "Sample text from a model.");
  gen->add_option("--from", gen_args.from, "Strata checkpoint (folder or step dir) or HF model dir")
      ->required();
  gen->add_option("--prompt", gen_args.prompt, "Text to continue")->required();
  gen->add_option("--max-new-tokens", gen_args.sampling.max_new_tokens, "Tokens to sample")
      ->capture_default_str();
  gen->add_option("--temperature", gen_args.sampling.temperature, "0: greedy")
      ->capture_default_str();
  gen->add_option("--top-k", gen_args.sampling.top_k, "Sample among the k most likely (0: all)")
      ->capture_default_str();
  gen->add_option("--seed", gen_args.sampling.seed, "Sampling seed")->capture_default_str();
  gen->add_option("--tokenizer", gen_args.tokenizer,
                  "tokenizer.model, tokenizer.json, a model directory or a Hub spec (default: the "
                  "source's)");
  gen->add_flag("--skip-memory-check", gen_args.skip_memory_check,
                "Run even when the memory estimate exceeds the memory available");

  ConvertArgs convert_args;
  CLI::App* convert = app.add_subcommand(
      "convert", "Convert a model between a Strata checkpoint and a Hugging Face directory.");
  convert
      ->add_option("--from", convert_args.from,
                   "Strata checkpoint (folder or step dir) or HF model dir")
      ->required();
  auto* to_hf =
      convert->add_option("--to-hf", convert_args.to_hf, "Write a Hugging Face model directory");
  auto* to_strata = convert->add_option("--to-strata", convert_args.to_strata,
                                        "Write a model-only Strata checkpoint folder");
  to_hf->excludes(to_strata);
  convert->add_option("--dtype", convert_args.dtype, "Output dtype")
      ->check(CLI::IsMember({"float32", "bfloat16", "float16"}))
      ->capture_default_str();
  convert->add_flag("--skip-memory-check", convert_args.skip_memory_check,
                    "Run even when the memory estimate exceeds the memory available");

  std::string inspect_path;
  bool inspect_verify = false;
  CLI::App* inspect =
      app.add_subcommand("inspect",
                         "List a checkpoint's tensors, files and checksums (a step directory, or a "
                         "checkpoint folder: its latest).");
  inspect->add_option("path", inspect_path, "Checkpoint step directory or folder")->required();
  inspect->add_flag("--verify", inspect_verify,
                    "Recompute every file's SHA-256 and block checksums and compare");

  TokenizeArgs tokenize_args;
  CLI::App* tokenize = app.add_subcommand(
      "tokenize",
      "Encode a text with a tokenizer and print its ids as one JSON array (the whole input is "
      "one text); with --decode, read a JSON array of ids and print their text.");
  tokenize
      ->add_option("--tokenizer", tokenize_args.tokenizer,
                   "tokenizer.model, tokenizer.json, a model directory holding one, or a Hub spec "
                   "hf://owner/repo[/subdir][@rev] (its tokenizer files only)")
      ->required();
  tokenize->add_option("--input", tokenize_args.input, "Input file (default: standard input)");
  tokenize->add_flag("--add-special-tokens", tokenize_args.add_special_tokens,
                     "Add the tokenizer's special tokens (e.g. BOS) as transformers does");
  tokenize->add_flag("--decode", tokenize_args.decode, "Decode a JSON array of ids");
  tokenize->add_option("--threads", tokenize_args.threads)->group("");
  tokenize->add_flag("--count", tokenize_args.count)->group("");
  tokenize->add_flag("--lines", tokenize_args.lines)->group("");

  ChatTemplateArgs chat_args;
  CLI::App* chat = app.add_subcommand(
      "chat-template",
      "Render a conversation with a chat template (as transformers' apply_chat_template does) "
      "and print it exactly.");
  chat->add_option("--template", chat_args.template_path,
                   "A Jinja template file, a tokenizer_config.json (or its directory), or a Hub "
                   "spec (its tokenizer_config.json)")
      ->required();
  chat->add_option("--messages", chat_args.messages_path,
                   "JSON: a list of {\"role\", \"content\"}, or {\"messages\": [...]}")
      ->required();
  chat->add_flag("--add-generation-prompt", chat_args.add_generation_prompt,
                 "Set add_generation_prompt (end with the assistant's header)");
  chat->add_option("--bos-token", chat_args.bos_token,
                   "bos_token as the template sees it (default: the tokenizer config's)");
  chat->add_option("--eos-token", chat_args.eos_token,
                   "eos_token as the template sees it (default: the tokenizer config's)");

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
    if (*chat) return run_chat_template(chat_args);
    if (*tokenize) return run_tokenize(tokenize_args);
    if (*eval) {
      eval_args.seq_len_given = eval->count("--seq-len") > 0;
      return run_eval(eval_args);
    }
    if (*gen) return run_generate(gen_args);
    if (*convert) {
      if (convert_args.to_hf.empty() && convert_args.to_strata.empty()) {
        throw strata::ConfigError("convert needs --to-hf DIR or --to-strata DIR");
      }
      return run_convert(convert_args, &argc, &argv, group);
    }
    if (!tokenizer_path.empty()) prep.tokenizer = local_tokenizer(tokenizer_path);
    if (!separator.empty()) prep.separator = separator;
    if (!chat_template.empty()) prep.chat_template = local_tokenizer(chat_template);
    return run_prepare_data(prep);
  } catch (const std::exception& e) {
    const std::string prefix =
        group && group->world_size() > 1 ? fmt::format("[rank {}] ", group->rank()) : "";
    std::fflush(stdout);
    fmt::print(stderr, "{}error: {}\n", prefix, e.what());
    return 1;
  }
}
