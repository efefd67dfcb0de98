// The training loop, top to bottom: set-up, then one step = micro-batches (forward, backward,
// accumulate) -> clip -> AdamW -> log; validation and a text sample every eval_interval.
#include "trainer/train.h"

#include <ATen/Parallel.h>
#include <fmt/format.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>

#include <nlohmann/json.hpp>
#include <set>

#include "checkpoint/checkpoint_manager.h"
#include "checkpoint/hub_spec.h"
#include "trainer/blas_kernels.h"
#include "trainer/converter.h"
#include "trainer/data_loader.h"
#include "trainer/fused_ops.h"
#include "trainer/generate.h"
#include "trainer/hf_io.h"
#include "trainer/llama.h"
#include "trainer/lr_schedule.h"
#include "trainer/metrics.h"
#include "trainer/model_source.h"
#include "trainer/resume.h"
#include "trainer/optimizer.h"
#include "trainer/seed.h"
#include "trainer/sharded_llama.h"
#include "trainer/signals.h"
#include "trainer/tokenizer.h"
#include "trainer/train_state.h"

namespace strata {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

at::Tensor to_tensor(const std::vector<int64_t>& values, int64_t batch, int64_t seq_len) {
  return at::from_blob(const_cast<int64_t*>(values.data()), {batch, seq_len}, at::kLong).clone();
}

// Mean next-token cross-entropy of `batch` under `model`.
at::Tensor batch_loss(const LanguageModel& model, const TokenBatch& batch) {
  at::Tensor logits = model.forward(to_tensor(batch.inputs, batch.batch, batch.seq_len));
  at::Tensor targets = to_tensor(batch.targets, batch.batch, batch.seq_len);
  if (fused::enabled(logits)) return fused::cross_entropy(logits.flatten(0, 1), targets.flatten());
  return at::cross_entropy_loss(logits.flatten(0, 1), targets.flatten());
}

// Mean token loss over the first `max_windows` consecutive validation windows, in fp64. The
// windows are split over the ranks; every rank runs the same number of forward passes (FSDP
// gathers need all of them), a rank without windows left repeats window 0 and ignores it.
std::pair<double, int64_t> evaluate(const LanguageModel& model, const TokenDataset& val,
                                    int64_t max_windows, int64_t micro_batch, Communicator& comm) {
  at::NoGradGuard no_grad;
  const int64_t windows = std::min(max_windows, val.num_sequential_windows());
  const int64_t per_rank = (windows + comm.world_size() - 1) / comm.world_size();
  const int64_t begin = comm.rank() * per_rank;
  const int64_t end = std::min(windows, begin + per_rank);
  at::Tensor sums = at::zeros({2}, at::kDouble);  // loss x tokens, tokens
  for (int64_t first = 0; first < per_rank; first += micro_batch) {
    const int64_t valid = std::clamp<int64_t>(end - (begin + first), 0, micro_batch);
    const TokenBatch batch = val.sequential_batch(valid > 0 ? begin + first : 0, std::max<int64_t>(valid, 1));
    const double loss = batch_loss(model, batch).item<double>();
    const int64_t n = valid * batch.seq_len;
    sums[0] += loss * static_cast<double>(n);
    sums[1] += static_cast<double>(n);
  }
  comm.all_reduce(sums, ReduceOp::kSum);
  const double tokens = sums[1].item<double>();
  return {tokens > 0 ? sums[0].item<double>() / tokens : 0.0, static_cast<int64_t>(tokens)};
}

class RunLog {
 public:
  explicit RunLog(bool enabled) : enabled_(enabled) {}
  template <typename... Args>
  void operator()(fmt::format_string<Args...> format, Args&&... args) const {
    if (!enabled_) return;
    fmt::print(format, std::forward<Args>(args)...);
    std::fputc('\n', stdout);
    std::fflush(stdout);
  }

 private:
  bool enabled_;
};

void write_text_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  out << text;
  if (!out) {
    throw std::runtime_error(fmt::format("cannot write {}\nHINT: check that job.run_dir is "
                                         "writable and the disk is not full",
                                         path.string()));
  }
}

// Per-rank bytes for parameters, gradients and AdamW state, the largest gathered unit, and
// what one rank of an unsharded run holds.
std::string memory_report(const std::vector<at::Tensor>& params, const ShardedLlama* sharded,
                          int64_t n_params, const char* mode) {
  int64_t held = 0, largest_unit = 0;
  for (const at::Tensor& p : params) held += p.numel();
  if (sharded) {
    for (const auto& unit : sharded->units()) largest_unit = std::max(largest_unit, unit->padded_numel());
  }
  const double mib = 4.0 / (1024.0 * 1024.0);  // fp32
  std::string report = fmt::format(
      "memory per rank ({}): parameters {:.2f} MiB, gradients {:.2f} MiB, optimizer {:.2f} MiB",
      mode, held * mib, held * mib, 2 * held * mib);
  if (sharded) {
    report += fmt::format("; largest gathered unit {:.2f} MiB; unsharded: {:.2f} / {:.2f} / {:.2f} MiB",
                          largest_unit * mib, n_params * mib, n_params * mib, 2 * n_params * mib);
    for (const auto& unit : sharded->units()) {
      report += fmt::format("\n  unit {}: {} elements, shard {} per rank", unit->name(), unit->numel(),
                            unit->shard_numel());
    }
  }
  return report;
}



// activation_checkpointing: recompute each FSDP unit in backward (full), or keep its gathered
// parameters and activations until backward (none: a third fewer FLOPs, one gather fewer).
// auto keeps them when the estimate for one rank stays under half of its share of the
// machine's available memory: every unit's full parameters, plus per layer and micro batch
// Megatron's activation estimate s·b·h·(34 + 5·a·s/h) bytes at 16 bits, times 2 for fp32 and
// times 2 for unfused attention, plus the logits and their gradient.
bool choose_recompute(const Config& config, const ProcessGroup& group, const RunLog& log) {
  const std::string& mode = config.parallel.fsdp.activation_checkpointing;
  if (mode != "auto") return mode == "full";
  const ModelConfig& mc = config.model;
  const double s = static_cast<double>(config.data.seq_len), b = static_cast<double>(config.training.micro_batch_size);
  const double h = static_cast<double>(mc.dim), a = static_cast<double>(mc.n_heads);
  const double keep = 4.0 * static_cast<double>(Llama::count_parameters(mc)) +
                      static_cast<double>(mc.n_layers) * s * b * h * (34.0 + 5.0 * a * s / h) * 4.0 +
                      3.0 * 4.0 * s * b * static_cast<double>(mc.vocab_size);
  double available = 0.0;
  std::ifstream meminfo("/proc/meminfo");
  for (std::string key; meminfo >> key;) {
    double kib = 0;
    meminfo >> kib;
    if (key == "MemAvailable:") available = kib * 1024.0;
    meminfo.ignore(256, '\n');
  }
  const double share = available / std::max(1, group.local_world_size());
  const bool recompute = available <= 0 || keep > 0.5 * share;
  log("fsdp: activation_checkpointing auto -> {}: keeping activations needs about {:.0f} MiB per rank, {:.0f} MiB "
      "available per rank",
      recompute ? "full" : "none", keep / (1 << 20), share / (1 << 20));
  return recompute;
}

}  // namespace

TrainSummary train(const Config& config, const ProcessGroup& group) {
  const RunLog log(group.is_main());
  const TrainingConfig& tc = config.training;
  const int threads = group.threads_per_rank(static_cast<int>(config.parallel.threads_per_rank));
  at::set_num_threads(threads);

  // Run directory: the resolved config first, so a failed run still says what it ran.
  const fs::path run_dir(config.job.run_dir);
  if (group.is_main()) {
    std::error_code ec;
    fs::create_directories(run_dir, ec);
    if (ec) {
      throw std::runtime_error(fmt::format("cannot create job.run_dir {}: {}\nHINT: choose a "
                                           "writable directory (--set job.run_dir=...)",
                                           run_dir.string(), ec.message()));
    }
    write_text_file(run_dir / "config.yaml", to_yaml(config));
  }
  log("{}", to_yaml(config));
  log("world: {}; {} intra-op thread(s) per rank", group.describe(), threads);
  log("BLAS: {}", blas_description());

  // Data.
  const ModelConfig& mc = config.model;
  const int64_t seq_len = config.data.seq_len;
  std::optional<Tokenizer> tokenizer;
  if (config.data.tokenizer) {
    tokenizer.emplace(*config.data.tokenizer);
    if (tokenizer->vocab_size() > mc.vocab_size) {
      throw ConfigError(fmt::format(
          "config error: data.tokenizer {} has {} pieces but model.vocab_size is {}\nHINT: set "
          "model.vocab_size to at least {}",
          *config.data.tokenizer, tokenizer->vocab_size(), mc.vocab_size,
          tokenizer->vocab_size()));
    }
  }
  const TokenDataset train_data(config.data.train, seq_len, mc.vocab_size);
  std::optional<TokenDataset> val_data;
  if (config.data.val && tc.eval_interval > 0) val_data.emplace(*config.data.val, seq_len, mc.vocab_size);
  log("data: train {} tokens in {} shard(s) ({}){}", train_data.num_tokens(),
      train_data.shards().size(), config.data.train,
      val_data ? fmt::format("; val {} tokens ({})", val_data->num_tokens(), *config.data.val)
               : std::string("; no validation"));

  // Model: one rank, or replicated data parallel, trains a whole Llama; several ranks with
  // FSDP train a ShardedLlama. Construction contract: storage first (meta -> CPU), then load
  // whatever the checkpoint holds, then initialise only the rest (per-(seed, fqn) generators).
  std::unique_ptr<Communicator> comm = make_mpi_communicator(group);
  const bool sharded = group.world_size() > 1 && config.parallel.fsdp.enabled;
  const bool replicated = group.world_size() > 1 && !sharded;
  const uint64_t seed = static_cast<uint64_t>(config.job.seed);
  std::unique_ptr<Llama> plain_model;
  std::unique_ptr<ShardedLlama> sharded_model;
  AdamW optimizer(config.optimizer);
  Converters converters(config.converters);
  for (const auto& c : converters.list()) log("converter: {}", c->describe());
  std::vector<at::Tensor> params;  // what the optimizer steps: whole tensors or flat shards
  if (sharded) {
    const bool recompute = choose_recompute(config, group, log);
    sharded_model = std::make_unique<ShardedLlama>(mc, *comm, recompute, &converters);
    params = sharded_model->add_to_optimizer(optimizer);
  } else {
    plain_model = std::make_unique<Llama>(mc, &converters);
    plain_model->materialize(at::kCPU);
    for (const auto& [fqn, param] : plain_model->parameters()) {
      if (!plain_model->trainable(fqn)) continue;  // frozen: no gradient, no optimizer state
      optimizer.add_parameter(fqn, param, uses_weight_decay(fqn, param.dim()));
      params.push_back(param);
    }
  }
  const LanguageModel& model =
      sharded ? static_cast<const LanguageModel&>(*sharded_model) : *plain_model;
  auto pieces_of = [&](const AdamW* with_optimizer, PieceUse use) {
    return sharded ? state_pieces(*sharded_model, with_optimizer)
                   : state_pieces(*plain_model, with_optimizer, group.rank(), group.world_size(), use);
  };

  // Resume: the run's own latest checkpoint, else checkpoint.resume_path, else from scratch.
  const CheckpointConfig& kc = config.checkpoint;
  const fs::path folder = fs::path(kc.folder).is_absolute() ? fs::path(kc.folder) : run_dir / kc.folder;
  ResumePlan plan;
  run_on_all_ranks(*comm, "choosing the checkpoint to resume from", [&] {
    if (!group.is_main()) return;
    plan = plan_resume(kc, folder, [&kc](const std::string& path) {
      const auto it = kc.local_dirs.find(path);
      return it != kc.local_dirs.end() ? it->second : path;
    });
  });
  plan = ResumePlan::from_json(broadcast_string(*comm, plan.to_json(), 0));
  {
    const nlohmann::json rank0 = nlohmann::json::parse(broadcast_string(*comm, nlohmann::json(kc.local_dirs).dump(), 0));
    plan.relocate(rank0.get<std::map<std::string, std::string>>(), kc.local_dirs);
  }
  const Resumed resumed_state =
      load_resume_source(plan, mc, kc, converters, config.converters, config.job.seed, tc.steps, *comm, optimizer,
                         pieces_of, [&log](const std::string& line) { log("{}", line); });
  // adapter-only checkpoints record the bases they apply to (rank 0 writes the metadata).
  const bool adapter_only = std::any_of(config.converters.begin(), config.converters.end(),
                                        [](const ConverterConfig& c) { return c.save == "adapter_only"; });
  nlohmann::json adapter_bases;
  if (adapter_only) {
    run_on_all_ranks(*comm, "fingerprinting the base model for adapter-only checkpoints", [&] {
      if (group.is_main()) adapter_bases = adapter_only_bases(plan);
    });
    if (group.is_main()) log("checkpoints: adapter-only, on base {}", adapter_bases.dump());
  }
  const int64_t start_step = resumed_state.step;
  const int64_t data_step_offset = resumed_state.data_step_offset;
  const int64_t lr_step_offset = resumed_state.lr_step_offset;
  const uint64_t data_seed = resumed_state.data_seed, sample_seed = resumed_state.sample_seed;
  const std::set<std::string>& loaded = resumed_state.loaded;
  // The base model a PEFT adapter exported on it names (base_model_name_or_path): the HF model
  // the run loaded its base from, as a Hub repo id when it came from a whole repo at main,
  // else its local directory.
  std::string source_base;
  {
    std::string given;
    if (plan.hf) given = plan.given;
    for (const LoadSource& s : plan.extra) {
      if (given.empty() && s.kind == LoadSource::Kind::kHf) given = s.given;
    }
    if (!given.empty()) {
      const auto local = kc.local_dirs.find(given);
      const std::string dir = local != kc.local_dirs.end() ? local->second : given;
      const std::optional<HubSpec> spec = dir == given ? std::nullopt : parse_hub_spec(given, false);
      source_base = spec && spec->subfolder.empty() && spec->revision.empty()
                        ? spec->repo_id
                        : fs::weakly_canonical(dir).string();  // symlinks resolved: hf-latest moves on
    }
  }
  // An export of a run that started from an HF directory keeps that directory's shard layout.
  const std::map<std::string, std::string> source_layout =
      plan.hf ? hf_weight_map(plan.dir) : std::map<std::string, std::string>();
  const std::vector<std::string> initialised =
      sharded ? sharded_model->initialize(seed, loaded) : plain_model->initialize(seed, loaded);
  const int64_t n_params = Llama::count_parameters(mc);
  // With converters: how much of the model trains (LoRA: the factors alone).
  std::string trainable;
  if (!converters.empty()) {
    int64_t total = 0, trained = 0;
    const Llama& names = sharded ? sharded_model->meta_model() : *plain_model;
    for (const auto& [fqn, p] : names.parameters()) {
      total += p.numel();
      if (names.trainable(fqn)) trained += p.numel();
    }
    trainable = fmt::format("; {:.3f}M of {:.2f}M parameters train ({:.2f}%)", trained / 1e6, total / 1e6,
                            100.0 * static_cast<double>(trained) / static_cast<double>(std::max<int64_t>(total, 1)));
  }
  log("model: llama, {:.2f}M parameters ({} layers, dim {}, {} heads / {} kv heads, ffn {}, "
      "vocab {}); {} tensors loaded, {} initialised from seed {}{}",
      n_params / 1e6, mc.n_layers, mc.dim, mc.n_heads, mc.n_kv_heads, mc.ffn_hidden_dim(),
      mc.vocab_size, loaded.size(), initialised.size(), config.job.seed, trainable);
  log("{}", memory_report(params, sharded_model.get(), n_params,
                          sharded ? "FSDP" : replicated ? "replicated data parallel" : "one rank"));

  TrainSummary summary;
  summary.num_parameters = n_params;
  summary.start_step = start_step;
  summary.resumed_from = plan.dir;
  if (start_step >= tc.steps) {
    log("done: the run is already at step {} >= training.steps {}; nothing to train (raise "
        "training.steps to continue, or use another job.run_dir to start over)",
        start_step, tc.steps);
    return summary;
  }

  const LrSchedule schedule(config.optimizer.lr, config.lr_scheduler, tc.steps);

  // Batch layout: global batch = micro batch x accumulation steps x ranks.
  const int64_t micro = tc.micro_batch_size;
  const int64_t accumulation = tc.global_batch_size / (micro * group.world_size());
  const int64_t tokens_per_step = tc.global_batch_size * seq_len;
  const double flops_per_token = Llama::training_flops_per_token(mc, seq_len);
  log("batch: global {} = micro {} x accumulation {} x ranks {}; {} tokens/step; "
      "{:.1f} MFLOP/token",
      tc.global_batch_size, micro, accumulation, group.world_size(), tokens_per_step,
      flops_per_token / 1e6);

  const bool resumed = start_step > 0;
  MetricsLogger metrics(group.is_main() ? (run_dir / config.logging.metrics_file).string() : "", resumed);
  std::unique_ptr<std::ofstream> samples;
  if (group.is_main()) {
    samples = std::make_unique<std::ofstream>(run_dir / "samples.txt",
                                              resumed ? std::ios::app : std::ios::trunc);
  }

  // Checkpoints.
  CheckpointOptions checkpoint_options;
  checkpoint_options.folder = folder.string();
  checkpoint_options.async = kc.async_mode == "async";
  checkpoint_options.keep_latest_k = kc.keep_latest_k;
  checkpoint_options.hf_max_keep = kc.hf_max_keep;
  CheckpointManager checkpoints(checkpoint_options, *comm,
                                [&log](const std::string& line) { log("{}", line); });
  install_stop_signal_handlers();
  // While an async save is in flight, its writer needs a core: with every core running an
  // intra-op thread, OpenMP regions would wait on a descheduled thread at every op. One
  // intra-op thread fewer while this rank's writer runs keeps the step time predictable.
  const bool async_saves = kc.enable && kc.async_mode == "async";
  bool fewer_threads = false;
  auto fit_threads = [&] {
    const bool want = async_saves && threads > 1 && checkpoints.writing();
    if (want != fewer_threads) {
      at::set_num_threads(want ? threads - 1 : threads);
      fewer_threads = want;
    }
  };
  // What a save writes: everything, or under adapter-only the converters' keys and their
  // moments (the base is recorded, not saved).
  auto save_pieces = [&](bool model_only) {
    std::vector<TensorPiece> pieces = pieces_of(model_only ? nullptr : &optimizer, PieceUse::kSave);
    if (!adapter_only) return pieces;
    pieces.erase(std::remove_if(pieces.begin(), pieces.end(),
                                [&](const TensorPiece& p) { return !converters.owned(parameter_of(p.key)); }),
                 pieces.end());
    return pieces;
  };
  if (async_saves) checkpoints.reserve_staging(save_pieces(/*model_only=*/false));
  const std::string config_yaml = to_yaml(config);
  auto save = [&](int64_t step, bool model_only) {
    SaveRequest request;
    request.step = step;
    request.model_only = model_only;
    request.pieces = save_pieces(model_only);
    const at::ScalarType export_dtype = dtype_named(kc.export_dtype);
    if (model_only && export_dtype != at::kFloat) {
      for (TensorPiece& piece : request.pieces) piece.local = piece.local.to(export_dtype);
    }
    request.metadata = {{"model", model_config_json(mc)}, {"saved_by", "strata"}};
    if (adapter_only) request.metadata["adapter_only"] = {{"bases", adapter_bases}};
    request.train_state = {
        {"step", step},
        {"world_size", group.world_size()},
        {"optimizer", {{"name", "adamw"}, {"steps_taken", optimizer.steps_taken()}}},
        {"lr_scheduler", {{"step", step - lr_step_offset}, {"total_steps", tc.steps}}},
        {"dataloader",
         {{"seed", data_seed},
          {"step", step - data_step_offset},
          {"samples_consumed", (step - data_step_offset) * tc.global_batch_size},
          {"global_batch_size", tc.global_batch_size}}},
        {"rng", {{"sample_seed", sample_seed},
                 {"note", "every random draw is a pure function of (seed, position)"}}}};
    request.config_yaml = config_yaml;
    checkpoints.save(std::move(request));
    fit_threads();
  };
  auto export_hf = [&](int64_t step) {
    checkpoints.export_hf(hf_export_job(step, plain_model.get(), sharded_model.get(), config,
                                        tokenizer ? &*tokenizer : nullptr, group.rank(),
                                        group.world_size(), /*hash_thread=*/!async_saves,
                                        &source_layout, source_base));
    fit_threads();
  };

  auto run_eval = [&](int64_t step, TrainSummary& summary) {
    if (!val_data) return;
    converters.set_training(false);
    struct Training {
      Converters& c;
      ~Training() { c.set_training(true); }
    } back_to_training{converters};
    const auto [val_loss, val_tokens] =
        evaluate(model, *val_data, tc.eval_batches * tc.global_batch_size, micro, *comm);
    summary.val_losses.emplace_back(step, val_loss);
    metrics.log_eval(step, val_loss, val_tokens);
    log("eval step {} | val_loss {:.4f} over {} tokens", step, val_loss, val_tokens);
    // Every rank samples (sharded forward passes are collectives); the main rank writes.
    SamplingOptions sampling;
    sampling.seed = sample_seed + step;
    const int64_t bos = tokenizer ? tokenizer->bos_id() : 1;
    sampling.stop_token = bos;  // documents are BOS-delimited: a new BOS ends the sample
    const std::vector<int64_t> ids = generate(model, {bos}, sampling);
    if (!group.is_main()) return;
    std::string text;
    if (tokenizer) {
      text = tokenizer->decode(ids);
    } else {
      for (int64_t id : ids) text += fmt::format("{} ", id);
    }
    log("sample step {} | {}", step, text);
    *samples << "=== step " << step << " ===\n" << text << "\n";
    samples->flush();
  };

  double window_seconds = 0.0, window_grad_norm = 0.0;
  CommStats window_comm = comm->stats();
  int64_t window_steps = 0;
  int64_t last_step = start_step;
  for (int64_t step = start_step + 1; step <= tc.steps; ++step) {
    const auto step_start = Clock::now();
    // Random draws in training (LoRA dropout) are a pure function of (seed, step, rank), so a
    // resumed run draws what the uninterrupted one did.
    at::manual_seed(derive_seed(seed, fmt::format("train/{}/{}", step, group.rank())));
    double step_loss = 0.0;
    for (int64_t a = 0; a < accumulation; ++a) {
      const int64_t first = a * (group.world_size() * micro) + group.rank() * micro;
      const TokenBatch batch = train_data.sample_batch(data_seed, step - data_step_offset, first, micro);
      at::Tensor loss = batch_loss(model, batch).div(static_cast<double>(accumulation));
      loss.backward();
      step_loss += loss.item<double>();
    }
    if (replicated) {
      for (at::Tensor& p : params) comm->all_reduce(p.mutable_grad(), ReduceOp::kAvg);
    }
    const double grad_norm = clip_grad_norm(params, tc.grad_clip, sharded ? comm.get() : nullptr);
    const double lr = schedule.at(step - lr_step_offset);
    checkpoints.wait_until_staged();  // an async save may still be copying the state
    optimizer.step(lr);
    optimizer.zero_grad();
    if (group.world_size() > 1) {  // the loss of the global batch, as one rank would see it
      at::Tensor loss = at::full({1}, step_loss, at::kDouble);
      comm->all_reduce(loss, ReduceOp::kAvg);
      step_loss = loss.item<double>();
    }
    const double step_seconds = seconds_since(step_start);
    last_step = step;

    summary.losses.push_back(step_loss);
    summary.train_seconds += step_seconds;
    window_seconds += step_seconds;
    window_grad_norm = grad_norm;
    ++window_steps;

    if (step % tc.log_interval == 0 || step == tc.steps || step == start_step + 1) {
      StepMetrics m;
      m.step = step;
      m.total_steps = tc.steps;
      m.loss = step_loss;
      m.grad_norm = window_grad_norm;
      m.lr = lr;
      m.step_ms = 1000.0 * window_seconds / window_steps;
      m.tokens_per_s = tokens_per_step * window_steps / window_seconds;
      m.tflops = m.tokens_per_s * flops_per_token / 1e12;
      if (config.logging.peak_tflops > 0) {
        m.mfu = m.tflops / (config.logging.peak_tflops * group.world_size());
      }
      m.mem_mb = resident_memory_mb();
      m.eta_s = (summary.train_seconds / static_cast<double>(step - start_step)) *
                static_cast<double>(tc.steps - step);
      const CommStats now = comm->stats();
      if (group.world_size() > 1) {
        m.comm_fraction = (now.seconds - window_comm.seconds) / window_seconds;
        m.comm_mb = (now.bytes - window_comm.bytes) / 1e6 / window_steps;
      }
      window_comm = now;
      log("{}", metrics.format(m));
      metrics.log_step(m);
      window_seconds = 0.0;
      window_steps = 0;
    }
    if (tc.eval_interval > 0 && (step % tc.eval_interval == 0 || step == tc.steps)) {
      run_eval(step, summary);
    }

    // Step boundary: commit a finished background save, agree on stop signals, save.
    const bool stop = checkpoints.poll(stop_requested());
    fit_threads();
    if (step == tc.steps) {
      if (kc.enable) save(step, kc.last_save_model_only);
      if (kc.enable && (kc.last_save_in_hf || (kc.hf_export_interval > 0 && step % kc.hf_export_interval == 0))) {
        export_hf(step);
      }
    } else if (stop) {
      log("stop: {} received; {}", *stop_signal_name() ? stop_signal_name() : "a stop signal on another rank",
          kc.enable ? fmt::format("saving a full checkpoint at step {}", step)
                    : std::string("checkpoint.enable is false, nothing is saved"));
      if (kc.enable) save(step, /*model_only=*/false);
      summary.stopped = true;
      break;
    } else {
      if (kc.enable && step % kc.interval == 0) save(step, kc.model_only);
      if (kc.enable && kc.hf_export_interval > 0 && step % kc.hf_export_interval == 0) export_hf(step);
    }
    window_comm = comm->stats();  // evaluation and saving are not training step time
  }
  checkpoints.finish();
  const int64_t trained = last_step - start_step;
  summary.tokens_per_s = summary.train_seconds > 0
                             ? tokens_per_step * static_cast<double>(trained) / summary.train_seconds
                             : 0.0;
  log("{}: {} steps (to step {}) in {:.1f} s, {:.0f} tokens/s, peak memory {:.0f} MiB{}",
      summary.stopped ? "stopped" : "done", trained, last_step, summary.train_seconds,
      summary.tokens_per_s, peak_resident_memory_mb(),
      summary.val_losses.empty()
          ? std::string()
          : fmt::format(", final val_loss {:.4f}", summary.val_losses.back().second));
  if (summary.stopped && kc.enable) {
    log("stop: checkpoint step {} committed; relaunch the same command to resume", last_step);
  }
  log("outputs: {} (config.yaml, {}, samples.txt{})", run_dir.string(), config.logging.metrics_file,
      kc.enable ? ", " + folder.string() : std::string());
  return summary;
}

}  // namespace strata
