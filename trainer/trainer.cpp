// The Trainer: set-up, one training step, metrics, evaluation, and what a save holds.
#include "trainer/trainer.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>

#include "checkpoint/hub/spec.h"
#include "parallel/bucketed.h"
#include "parallel/launcher.h"
#include "parallel/nccl_communicator.h"
#include "trainer/device.h"
#include "trainer/evaluate.h"
#include "trainer/kernels/blas.h"
#include "trainer/kernels/fused_ops.h"
#include "trainer/memory_estimate.h"
#include "trainer/model/generate.h"
#include "trainer/model/hf_io.h"
#include "trainer/seed.h"
#include "trainer/state_pieces.h"

namespace strata {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

void write_text_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  out << text;
  if (!out) {
    throw std::runtime_error(
        fmt::format("cannot write {}\nHINT: check that job.run_dir is "
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
    for (const auto& unit : sharded->units())
      largest_unit = std::max(largest_unit, unit->padded_numel());
  }
  const double mib = 4.0 / (1024.0 * 1024.0);  // fp32
  std::string report = fmt::format(
      "memory per rank ({}): parameters {:.2f} MiB, gradients {:.2f} MiB, optimizer {:.2f} MiB",
      mode, held * mib, held * mib, 2 * held * mib);
  if (sharded) {
    report +=
        fmt::format("; largest gathered unit {:.2f} MiB; unsharded: {:.2f} / {:.2f} / {:.2f} MiB",
                    largest_unit * mib, n_params * mib, n_params * mib, 2 * n_params * mib);
    for (const auto& unit : sharded->units()) {
      report += fmt::format("\n  unit {}: {} elements, shard {} per rank", unit->name(),
                            unit->numel(), unit->shard_numel());
    }
  }
  return report;
}

// activation_checkpointing: recompute each FSDP unit in backward (full), or keep its gathered
// parameters and activations until backward (none: a third fewer FLOPs, one gather fewer).
// auto keeps them when the estimate for one rank stays under half of what it may still fill
// (free_memory_bytes: its share of the machine's available memory, or its GPU's free memory):
// every unit's full parameters in param_dtype, plus per layer and micro batch Megatron's
// activation estimate s·b·h·(34 + 5·a·s/h) bytes at 16 bits (times 2 for fp32; the attention
// scores' 5·a·s/h only on CPU, where the attention is not flash or memory-efficient, and there
// times 2 again for the unfused kernels), plus the logits and their gradient in fp32.
bool choose_recompute(const Config& config, const ProcessGroup& group, const at::Device& device,
                      at::ScalarType param_dtype, const RunLog& log) {
  const std::string& mode = config.parallel.fsdp.activation_checkpointing;
  if (mode != "auto") return mode == "full";
  const ModelConfig& mc = config.model;
  const double s = static_cast<double>(config.data.seq_len),
               b = static_cast<double>(config.training.micro_batch_size);
  const double h = static_cast<double>(mc.dim), a = static_cast<double>(mc.n_heads);
  const double bytes = param_dtype == at::kFloat ? 4.0 : 2.0;
  const double per_layer =
      device.is_cpu() ? s * b * h * (34.0 + 5.0 * a * s / h) * 4.0 : s * b * h * 34.0 * bytes / 2.0;
  const double keep = bytes * static_cast<double>(Llama::count_parameters(mc)) +
                      static_cast<double>(mc.n_layers) * per_layer +
                      3.0 * 4.0 * s * b * static_cast<double>(mc.vocab_size);
  const double share = free_memory_bytes(device, group.local_world_size());
  const bool recompute = share <= 0 || keep > 0.5 * share;
  log(fmt::format(
      "fsdp: activation_checkpointing auto -> {}: keeping activations needs about {:.0f} MiB per "
      "rank, {:.0f} MiB {} per rank",
      recompute ? "full" : "none", keep / (1 << 20), share / (1 << 20),
      device.is_cpu() ? "available" : "free on the GPU"));
  return recompute;
}

}  // namespace

void RunLog::operator()(const std::string& line) const {
  if (!enabled_) return;
  std::fputs(line.c_str(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
}

Trainer::Trainer(const Config& cfg, const ProcessGroup& g, const TrainOptions& options)
    : config(cfg), group(g), log(g.is_main()), before_write_(options.before_checkpoint_write) {
  comm_ = make_mpi_communicator(group);
  setup_run_dir();
  setup_device();
  setup_data();
  setup_model();
  setup_resume(options);
}

Trainer::~Trainer() = default;

void Trainer::setup_run_dir() {
  threads_ = group.threads_per_rank(static_cast<int>(config.parallel.threads_per_rank));
  at::set_num_threads(threads_);
  fused::set_enabled(config.training.fused_kernels);
  // Run directory: the resolved config first, so a failed run still says what it ran.
  const fs::path run_dir(config.job.run_dir);
  config_yaml_ = to_yaml(config);
  // Rank 0 locks the run directory before writing into it (one job per run_dir, see
  // checkpoint/run_lock.h); every rank fails alike when another job holds it.
  run_on_all_ranks<CheckpointError>(*comm_, "setting up job.run_dir", [&] {
    if (!group.is_main()) return;
    std::error_code ec;
    fs::create_directories(run_dir, ec);
    if (ec) {
      throw std::runtime_error(
          fmt::format("cannot create job.run_dir {}: {}\nHINT: choose a "
                      "writable directory (--set job.run_dir=...)",
                      run_dir.string(), ec.message()));
    }
    run_lock_.emplace(run_dir.string());
    write_text_file(run_dir / "config.yaml", config_yaml_);
  });
  if (run_lock_ && !run_lock_->locked()) log("warning: " + run_lock_->warning());
  if (run_lock_ && run_lock_->locked() && !run_lock_->previous().empty()) {
    log(fmt::format(
        "run lock: {} named {}, which no longer held it (killed, its node went down, or locks are "
        "not shared between nodes here); taken over",
        run_lock_->path(), run_lock_->previous().describe()));
  }
  log(config_yaml_);
  log(fmt::format("world: {}; {} intra-op thread(s) per rank", group.describe(), threads_));
  log("launch: " + launcher_description());
  log(fmt::format("BLAS: {}", blas_description()));
  const CheckpointConfig& kc = config.checkpoint;
  checkpoint_folder =
      (fs::path(kc.folder).is_absolute() ? fs::path(kc.folder) : run_dir / kc.folder).string();
}

// parallel.device and parallel.backend: a CUDA rank takes the GPU of its local rank; the model's
// tensors then move over NCCL, and everything else (agreements, plans, checkpoint reports,
// errors, the host values of log lines) over MPI, so nothing hands CPU tensors to NCCL.
void Trainer::setup_device() {
  const ParallelConfig& pc = config.parallel;
  std::string backend;
  run_on_all_ranks<ConfigError>(*comm_, "choosing the device", [&] {
    device_ = resolve_device(pc.device, group.local_rank(), group.local_world_size(),
                             cuda_device_count());
    backend = resolve_backend(pc.backend, device_);
  });
  if (device_.is_cuda()) device_comm_ = make_nccl_communicator(group, device_.index());
  const MixedPrecisionConfig& mp = pc.fsdp.mixed_precision;
  param_dtype_ = dtype_named(mp.param_dtype);
  const std::string name = device_name(device_);
  log(fmt::format("device: {} ({}), backend {}{}", device_.str(), name, backend,
                  device_.is_cuda() ? "; CUDA " + cuda_description() : std::string()));
  log(
      fmt::format("precision: parameters {} in compute, gradients reduced in {}; master weights "
                  "and AdamW state float32",
                  mp.param_dtype, mp.reduce_dtype));
  log(fmt::format("kernels: {} (training.fused_kernels: {})",
                  device_.is_cpu() && config.training.fused_kernels && param_dtype_ == at::kFloat
                      ? "Strata's fused CPU kernels"
                      : "the ATen composition",
                  config.training.fused_kernels ? "true" : "false"));
  const ModelConfig& mc = config.model;
  log("attention: " + attention_backend(device_, param_dtype_, config.data.document_masking,
                                        mc.head_dim(), mc.n_heads, mc.n_kv_heads));
  const bool configured = config.logging.peak_tflops > 0;
  peak_tflops_ = configured ? config.logging.peak_tflops : default_peak_tflops(name, param_dtype_);
  log(peak_tflops_ > 0
          ? fmt::format("mfu: against {:.0f} TFLOP/s per device ({})", peak_tflops_,
                        configured ? "logging.peak_tflops"
                                   : "the peak of " + name + " in " + mp.param_dtype)
          : fmt::format("mfu: not reported (no peak known for {}; set logging.peak_tflops)", name));
}

void Trainer::setup_data() {
  const ModelConfig& mc = config.model;
  if (config.data.tokenizer) {
    tokenizer_.emplace(*config.data.tokenizer);
    if (tokenizer_->vocab_size() > mc.vocab_size) {
      throw ConfigError(fmt::format(
          "config error: data.tokenizer {} has {} pieces but model.vocab_size is {}\nHINT: set "
          "model.vocab_size to at least {}",
          *config.data.tokenizer, tokenizer_->vocab_size(), mc.vocab_size,
          tokenizer_->vocab_size()));
    }
  }
  if (!config.data.sources.empty()) {  // a weighted mixture (trainer/data/mixture.h)
    OpenedSources opened =
        open_data_sources(config.data, mc.vocab_size, config.training.eval_interval > 0);
    train_data_.emplace(std::move(opened.train));
    val_sources_ = std::move(opened.val);
    log(opened.description);
  } else {
    std::vector<MixtureSource> one;
    one.push_back(
        {"train", 1.0, TokenDataset(config.data.train, config.data.seq_len, mc.vocab_size)});
    train_data_.emplace(std::move(one));
    if (config.data.val && config.training.eval_interval > 0) {
      val_data_.emplace(*config.data.val, config.data.seq_len, mc.vocab_size);
    }
    const TokenDataset& train = train_data_->source(0).data;
    log(fmt::format(
        "data: train {} tokens in {} shard(s) ({}){}", train.num_tokens(), train.shards().size(),
        config.data.train,
        val_data_ ? fmt::format("; val {} tokens ({})", val_data_->num_tokens(), *config.data.val)
                  : std::string("; no validation")));
  }
  if (config.data.document_masking && !train_data_->has_documents()) {
    throw DataError(fmt::format(
        "data.document_masking is on, but the shards of {} do not mark where documents start: "
        "only packed instruction data does\nHINT: prepare the data with `strata prepare-data "
        "--format jsonl --seq-len {}`, or set data.document_masking: false",
        config.data.sources.empty()
            ? fmt::format("data.train '{}'", config.data.train)
            : fmt::format("every one of the {} data.sources", config.data.sources.size()),
        config.data.seq_len));
  }
}

// One rank, or replicated data parallel, trains a whole Llama; several ranks with FSDP train a
// ShardedLlama. Construction contract: storage first (meta -> CPU), then load whatever the
// checkpoint holds, then initialise only the rest (per-(seed, fqn) generators).
void Trainer::setup_model() {
  // Mixed precision lives in the FSDP units, so it shards on one rank too (a world of one).
  const MixedPrecisionConfig& mp = config.parallel.fsdp.mixed_precision;
  const bool mixed = mp.param_dtype != "float32" || mp.reduce_dtype != "float32";
  sharded_ = (group.world_size() > 1 || mixed) && config.parallel.fsdp.enabled;
  replicated_ = group.world_size() > 1 && !sharded_;
  if (sharded_) {
    try {  // the same on every rank: each throws the same message
      layout_ = plan_shard_layout(config.parallel.fsdp.shard_group_size, group.rank_nodes(),
                                  group.node_hostnames());
    } catch (const DistributedError& e) {
      throw ConfigError(fmt::format("config error: {}", e.what()));
    }
    const int rank = group.rank();
    shard_comm_ = tensor_comm().split(layout_.shard_group(rank), layout_.shard_rank(rank));
    if (layout_.hybrid())
      replica_comm_ = tensor_comm().split(layout_.shard_rank(rank), layout_.shard_group(rank));
    log(layout_.describe(group.rank_nodes(), group.node_hostnames()));
  }
  // Before anything is allocated: refuse what cannot fit (every rank alike; nodes may differ).
  // The estimate is of host memory (fp32 everywhere), which a CUDA run does not fill.
  if (device_.is_cpu()) {
    std::string memory_line;
    run_on_all_ranks<ConfigError>(*comm_, "the memory check", [&] {
      memory_line = check_training_memory(config, group.world_size(), group.local_world_size(),
                                          available_memory(), layout_.shard_size);
    });
    log(memory_line);
  } else {
    log("memory: the start-up estimate is of host memory; not checked on CUDA (the metrics "
        "report the GPU allocator's peaks)");
  }
  optimizer_ = std::make_unique<AdamW>(config.optimizer);
  converters_ = std::make_unique<Converters>(config.converters);
  for (const auto& c : converters_->list()) log(fmt::format("converter: {}", c->describe()));
  if (sharded_) {
    const bool recompute = choose_recompute(config, group, device_, param_dtype_, log);
    FsdpOptions options;
    options.device = device_;
    options.param_dtype = param_dtype_;
    options.reduce_dtype = dtype_named(mp.reduce_dtype);
    sharded_model_ = std::make_unique<ShardedLlama>(config.model, *shard_comm_, recompute,
                                                    converters_.get(), options);
    params_ = sharded_model_->add_to_optimizer(*optimizer_);
  } else {
    plain_model_ = std::make_unique<Llama>(config.model, converters_.get());
    plain_model_->materialize(device_);
    for (const auto& [fqn, param] : plain_model_->parameters()) {
      if (!plain_model_->trainable(fqn)) continue;  // frozen: no gradient, no optimizer state
      optimizer_->add_parameter(fqn, param, uses_weight_decay(fqn, param.dim()));
      params_.push_back(param);
    }
  }
}

// Resume: the run's own latest checkpoint, else checkpoint.resume_path, else from scratch.
void Trainer::setup_resume(const TrainOptions& options) {
  const ModelConfig& mc = config.model;
  const CheckpointConfig& kc = config.checkpoint;
  const std::map<std::string, std::string>& local_dirs = options.local_dirs;
  ResumePlan plan;
  run_on_all_ranks<CheckpointError>(*comm_, "choosing the checkpoint to resume from", [&] {
    if (!group.is_main()) return;
    plan = plan_resume(kc, checkpoint_folder, [&](const std::string& path) {
      const auto it = local_dirs.find(path);
      return it != local_dirs.end() ? it->second : path;
    });
  });
  plan = ResumePlan::from_json(comm_->broadcast_string(plan.to_json(), 0));
  const nlohmann::json rank0 =
      nlohmann::json::parse(comm_->broadcast_string(nlohmann::json(local_dirs).dump(), 0));
  plan.relocate(rank0.get<std::map<std::string, std::string>>(), local_dirs);
  const WeightTarget target{&mc, converters_.get(), &config.converters,
                            [this] { return pieces_of(nullptr, PieceUse::kLoad); }};
  const Resumed resumed = resume(
      plan, kc, config.job.seed, config.training.steps, target, *optimizer_,
      [this](const AdamW* optimizer, PieceUse use) { return pieces_of(optimizer, use); }, *comm_,
      log);
  state = resumed.state;
  resumed_from = plan.dir;
  // adapter-only checkpoints record the bases they apply to (rank 0 writes the metadata).
  adapter_only_ = std::any_of(config.converters.begin(), config.converters.end(),
                              [](const ConverterConfig& c) { return c.save == "adapter_only"; });
  if (adapter_only_) {
    run_on_all_ranks<CheckpointError>(
        *comm_, "fingerprinting the base model for adapter-only checkpoints", [&] {
          if (group.is_main()) adapter_bases_ = adapter_only_record(plan);
        });
    log(fmt::format("checkpoints: adapter-only, on base {}", adapter_bases_.dump()));
  }
  // The base model a PEFT adapter exported on it names (base_model_name_or_path): the HF model
  // the run loaded its base from, as a Hub repo id when it came from a whole repo at main,
  // else its local directory (symlinks resolved: hf-latest moves on).
  std::string given = plan.hf ? plan.given : "";
  for (const WeightSource& s : plan.extra) {
    if (given.empty() && s.kind == WeightSource::Kind::kHf) given = s.given;
  }
  if (!given.empty()) {
    const auto local = local_dirs.find(given);
    const std::string dir = local != local_dirs.end() ? local->second : given;
    const std::optional<HubSpec> spec = dir == given ? std::nullopt : parse_hub_spec(given, false);
    source_base_ = spec && spec->subfolder.empty() && spec->revision.empty()
                       ? spec->repo_id
                       : fs::weakly_canonical(dir).string();
  }
  // An export of a run that started from an HF directory keeps that directory's shard layout.
  if (plan.hf) source_layout_ = hf_weight_map(plan.dir);
  const uint64_t seed = static_cast<uint64_t>(config.job.seed);
  const std::vector<std::string> initialised =
      sharded_ ? sharded_model_->initialize(seed, resumed.loaded)
               : plain_model_->initialize(seed, resumed.loaded);
  num_parameters = Llama::count_parameters(mc);
  // With converters: how much of the model trains (LoRA: the factors alone).
  std::string trainable;
  if (!converters_->empty()) {
    int64_t total = 0, trained = 0;
    const Llama& names = sharded_ ? sharded_model_->meta_model() : *plain_model_;
    for (const auto& [fqn, p] : names.parameters()) {
      total += p.numel();
      if (names.trainable(fqn)) trained += p.numel();
    }
    trainable = fmt::format(
        "; {:.3f}M of {:.2f}M parameters train ({:.2f}%)", trained / 1e6, total / 1e6,
        100.0 * static_cast<double>(trained) / static_cast<double>(std::max<int64_t>(total, 1)));
  }
  log(fmt::format(
      "model: llama, {:.2f}M parameters ({} layers, dim {}, {} heads / {} kv heads, ffn {}, "
      "vocab {}); {} tensors loaded, {} initialised from seed {}{}",
      num_parameters / 1e6, mc.n_layers, mc.dim, mc.n_heads, mc.n_kv_heads, mc.ffn_hidden_dim(),
      mc.vocab_size, resumed.loaded.size(), initialised.size(), config.job.seed, trainable));
  log(memory_report(params_, sharded_model_.get(), num_parameters,
                    layout_.hybrid() ? "hybrid sharding"
                    : sharded_       ? "FSDP"
                    : replicated_    ? "replicated data parallel"
                                     : "one rank"));
}

void Trainer::begin() {
  const TrainingConfig& tc = config.training;
  const CheckpointConfig& kc = config.checkpoint;
  schedule_.emplace(config.optimizer.lr, config.lr_scheduler, tc.steps);
  // Batch layout: global batch = micro batch x accumulation steps x ranks.
  accumulation_ = tc.global_batch_size / (tc.micro_batch_size * group.world_size());
  tokens_per_step_ = tc.global_batch_size * config.data.seq_len;
  flops_per_token_ = Llama::training_flops_per_token(config.model, config.data.seq_len);
  log(
      fmt::format("batch: global {} = micro {} x accumulation {} x ranks {}; {} tokens/step; "
                  "{:.1f} MFLOP/token",
                  tc.global_batch_size, tc.micro_batch_size, accumulation_, group.world_size(),
                  tokens_per_step_, flops_per_token_ / 1e6));
  const bool resumed = state.step > 0;
  const fs::path run_dir(config.job.run_dir);
  metrics_ = std::make_unique<MetricsLogger>(
      group.is_main() ? (run_dir / config.logging.metrics_file).string() : "", resumed);
  if (group.is_main()) {
    samples_ = std::make_unique<std::ofstream>(run_dir / "samples.txt",
                                               resumed ? std::ios::app : std::ios::trunc);
  }
  CheckpointOptions options;
  options.folder = checkpoint_folder;
  options.async = kc.async_mode == "async";
  options.keep_latest_k = kc.keep_latest_k;
  options.hf_max_keep = kc.hf_max_keep;
  options.before_write = before_write_;
  checkpoints = std::make_unique<CheckpointManager>(options, *comm_, log);
  save_policy = {kc.enable,          kc.interval,          kc.model_only, kc.last_save_model_only,
                 kc.last_save_in_hf, kc.hf_export_interval};
  if (kc.enable && options.async) checkpoints->reserve_staging(save_pieces(/*model_only=*/false));
  window_comm_ = comm_stats();
}

StepResult Trainer::train_step(int64_t step) {
  const auto start = Clock::now();
  const int64_t micro = config.training.micro_batch_size;
  // Random draws in training (LoRA dropout) are a pure function of (seed, step, rank), so a
  // resumed run draws what the uninterrupted one did.
  at::manual_seed(derive_seed(static_cast<uint64_t>(config.job.seed),
                              fmt::format("train/{}/{}", step, group.rank())));
  StepResult r;
  const int64_t data_step = step - state.data_step_offset;
  // With a loss mask, the loss is the mean over the targets of the whole global batch (every
  // rank counts them from the masks: the batch is a pure function of the step), so each
  // micro-batch adds its sum over its targets divided by that count; the gradient average over
  // the ranks divides by the world size, which the scale undoes.
  double masked_scale = 0.0;
  if (train_data_->has_loss_mask()) {
    const int64_t targets = train_data_->sample_target_count(state.data_seed, data_step, 0,
                                                             config.training.global_batch_size);
    masked_scale = targets > 0 ? static_cast<double>(group.world_size()) / targets : 0.0;
  }
  if (train_data_->num_sources() > 1) {  // what each source gives the global batch (all ranks)
    const std::vector<int64_t> counts = train_data_->source_counts(
        state.data_seed, data_step, 0, config.training.global_batch_size);
    window_source_samples_.resize(counts.size(), 0);
    for (size_t k = 0; k < counts.size(); ++k) window_source_samples_[k] += counts[k];
  }
  const bool per_document = config.data.document_masking;
  // The loss of this rank's part of the batch, summed on the device (fp64, as the host summed).
  at::Tensor loss_sum = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(device_));
  for (int64_t a = 0; a < accumulation_; ++a) {
    const int64_t first = a * (group.world_size() * micro) + group.rank() * micro;
    const TokenBatch batch = train_data_->sample_batch(state.data_seed, data_step, first, micro);
    at::Tensor loss =
        train_data_->has_loss_mask()
            ? batch_loss_sum(model(), batch, per_document).mul(masked_scale)
            : batch_loss(model(), batch, per_document).div(static_cast<double>(accumulation_));
    loss.backward();
    loss_sum.add_(loss.detach());
  }
  if (sharded_) sharded_model_->finish_gradients();  // reduce-scatters still in flight
  std::vector<at::Tensor> grads;
  if (replicated_ || replica_comm_) {
    for (at::Tensor& p : params_) {
      if (p.numel() == 0) continue;  // the same on every rank of a group
      if (!p.grad().defined()) p.mutable_grad() = at::zeros_like(p);
      grads.push_back(p.grad());
    }
  }
  // Replicated data parallelism averages the whole gradients; hybrid sharding the shard group's
  // gradient shards, accumulated over the micro-batches, with the other replicas' once per step.
  if (replicated_) all_reduce_buckets(tensor_comm(), grads, ReduceOp::kAvg);
  if (replica_comm_) all_reduce_buckets(*replica_comm_, grads, ReduceOp::kAvg);
  // The global norm: over the shards of one shard group (every replica holds the same).
  window_grad_norm_ =
      clip_grad_norm_(params_, config.training.grad_clip, sharded_ ? shard_comm_.get() : nullptr);
  r.lr = schedule_->at(step - state.lr_step_offset);
  checkpoints->wait_until_staged();  // an async save may still be copying the state
  optimizer_->step(r.lr);
  optimizer_->zero_grad();
  pending_losses_.push_back(loss_sum);
  state.step = step;
  r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  window_seconds_ += r.seconds;
  ++window_steps_;
  return r;
}

void Trainer::resolve_losses(TrainSummary& summary) {
  if (pending_losses_.empty()) return;
  // The loss of the global batch, as one rank would see it: the ranks' average, per step.
  at::Tensor losses = at::stack(pending_losses_).to(at::kCPU);
  pending_losses_.clear();
  if (group.world_size() > 1) comm_->all_reduce(losses, ReduceOp::kAvg);
  const double* values = losses.data_ptr<double>();
  summary.losses.insert(summary.losses.end(), values, values + losses.numel());
}

void Trainer::log_metrics(int64_t step, const StepResult& result, TrainSummary& summary) {
  const TrainingConfig& tc = config.training;
  if (step % tc.log_interval != 0 && step != tc.steps && step != summary.start_step + 1) return;
  // Reading the device's values waits for its queued work: that wait is step time too.
  const auto sync_start = Clock::now();
  resolve_losses(summary);
  StepMetrics m;
  m.grad_norm = window_grad_norm_.defined() ? window_grad_norm_.item<double>() : 0.0;
  window_seconds_ += std::chrono::duration<double>(Clock::now() - sync_start).count();
  m.step = step;
  m.total_steps = tc.steps;
  m.loss = summary.losses.back();
  m.lr = result.lr;
  m.step_ms = 1000.0 * window_seconds_ / window_steps_;
  m.tokens_per_s = tokens_per_step_ * window_steps_ / window_seconds_;
  m.tflops = m.tokens_per_s * flops_per_token_ / 1e12;
  if (peak_tflops_ > 0) m.mfu = m.tflops / (peak_tflops_ * group.world_size());
  const DeviceMemory memory = device_memory(device_);
  m.mem_mb = memory.peak_allocated_mb;
  if (device_.is_cuda()) m.mem_reserved_mb = memory.peak_reserved_mb;
  reset_peak_memory(device_);
  m.eta_s = (summary.train_seconds / static_cast<double>(step - summary.start_step)) *
            static_cast<double>(tc.steps - step);
  const CommWindow now = comm_stats();
  if (group.world_size() > 1) {
    const double per_step = 1e6 * static_cast<double>(window_steps_);
    m.comm_fraction = (now.all.seconds - window_comm_.all.seconds) / window_seconds_;
    m.comm_mb = (now.all.bytes - window_comm_.all.bytes) / per_step;
    m.comm_exposed_fraction =
        (now.all.exposed_seconds - window_comm_.all.exposed_seconds) / window_seconds_;
    if (sharded_) {
      m.comm_mb_shard = (now.shard.bytes - window_comm_.shard.bytes) / per_step;
      m.comm_mb_replica = (now.replica.bytes - window_comm_.replica.bytes) / per_step;
    }
  }
  window_comm_ = now;
  for (size_t k = 0; k < window_source_samples_.size(); ++k) {
    m.tokens_by_source.emplace_back(train_data_->source(k).name,
                                    window_source_samples_[k] * config.data.seq_len);
    window_source_samples_[k] = 0;
  }
  log(metrics_->format(m));
  metrics_->log_step(m);
  window_seconds_ = 0.0;
  window_steps_ = 0;
}

void Trainer::evaluate_and_sample(int64_t step, TrainSummary& summary) {
  if (!val_data_ && val_sources_.empty()) return;
  converters_->set_training(false);
  struct Training {
    Converters& c;
    ~Training() { c.set_training(true); }
  } back_to_training{*converters_};
  const TrainingConfig& tc = config.training;
  // A mixture: each source's val set with the same budget; val_loss is their weighted mean.
  std::vector<std::pair<std::string, double>> by_source;
  std::string by_source_text;
  EvalResult eval;
  if (val_data_) {
    eval = evaluate(model(), *val_data_, tc.eval_batches * tc.global_batch_size,
                    tc.micro_batch_size, comm_.get(), config.data.document_masking);
  } else {
    std::vector<SourceEval> sources;
    for (const MixtureSource& source : val_sources_) {
      const EvalResult e = evaluate(model(), source.data, tc.eval_batches * tc.global_batch_size,
                                    tc.micro_batch_size, comm_.get(), config.data.document_masking);
      sources.push_back({source.name, source.weight, e.loss, e.tokens});
      by_source.emplace_back(source.name, e.loss);
      by_source_text +=
          fmt::format("{}{} {:.4f}", by_source_text.empty() ? " (" : ", ", source.name, e.loss);
      eval.tokens += e.tokens;
    }
    eval.loss = mixture_val_loss(sources);
    by_source_text += ")";
  }
  summary.val_losses.emplace_back(step, eval.loss);
  metrics_->log_eval(step, eval.loss, eval.tokens, by_source);
  log(fmt::format("eval step {} | val_loss {:.4f} over {} tokens{}", step, eval.loss, eval.tokens,
                  by_source_text));
  // Every rank samples (sharded forward passes are collectives); the main rank writes.
  SamplingOptions sampling;
  sampling.seed = state.sample_seed + step;
  // Documents are BOS-delimited (EOS-delimited with a tokenizer without BOS): a new one ends
  // the sample.
  const int64_t bos = !tokenizer_                 ? 1
                      : tokenizer_->bos_id() >= 0 ? tokenizer_->bos_id()
                                                  : tokenizer_->eos_id();
  sampling.stop_token = bos;
  const std::vector<int64_t> ids = generate(model(), {bos}, sampling);
  if (!group.is_main()) return;
  std::string text;
  if (tokenizer_) {
    text = tokenizer_->decode(ids);
  } else {
    for (int64_t id : ids) text += fmt::format("{} ", id);
  }
  log(fmt::format("sample step {} | {}", step, text));
  *samples_ << "=== step " << step << " ===\n" << text << "\n";
  samples_->flush();
}

Trainer::CommWindow Trainer::comm_stats() const {
  CommWindow w;
  if (shard_comm_) w.shard = shard_comm_->stats();
  if (replica_comm_) w.replica = replica_comm_->stats();
  w.all = comm_->stats();
  if (device_comm_) w.all += device_comm_->stats();
  w.all += w.shard;
  w.all += w.replica;
  return w;
}

void Trainer::end_step() {
  window_comm_ = comm_stats();
}

// While an async save is in flight, its writer needs a core: with every core running an
// intra-op thread, OpenMP regions would wait on a descheduled thread at every op. One
// intra-op thread fewer while this rank's writer runs keeps the step time predictable.
void Trainer::on_writer_change() {
  const bool want = config.checkpoint.enable && config.checkpoint.async_mode == "async" &&
                    threads_ > 1 && checkpoints->writing();
  if (want != fewer_threads_) {
    at::set_num_threads(want ? threads_ - 1 : threads_);
    fewer_threads_ = want;
  }
}

std::vector<TensorPiece> Trainer::pieces_of(const AdamW* optimizer, PieceUse use) const {
  if (!sharded_)
    return state_pieces(*plain_model_, optimizer, group.rank(), group.world_size(), use);
  std::vector<TensorPiece> pieces = state_pieces(*sharded_model_, optimizer);
  // Hybrid sharding: each replica of a shard writes its own part of it.
  if (use == PieceUse::kSave && layout_.hybrid()) {
    return share_of_pieces(std::move(pieces), layout_.shard_group(group.rank()),
                           layout_.replicas());
  }
  return pieces;
}

// What a save writes: everything, or under adapter-only the converters' keys and their moments
// (the base is recorded, not saved).
std::vector<TensorPiece> Trainer::save_pieces(bool model_only) const {
  std::vector<TensorPiece> pieces =
      pieces_of(model_only ? nullptr : optimizer_.get(), PieceUse::kSave);
  if (!adapter_only_) return pieces;
  pieces.erase(std::remove_if(
                   pieces.begin(), pieces.end(),
                   [&](const TensorPiece& p) { return !converters_->owned(parameter_of(p.key)); }),
               pieces.end());
  return pieces;
}

SaveRequest Trainer::save_request(int64_t step, bool model_only) {
  const CheckpointConfig& kc = config.checkpoint;
  SaveRequest request;
  request.step = step;
  request.model_only = model_only;
  request.pieces = save_pieces(model_only);
  const at::ScalarType export_dtype = dtype_named(kc.export_dtype);
  if (model_only && export_dtype != at::kFloat) {
    for (TensorPiece& piece : request.pieces) piece.local = piece.local.to(export_dtype);
  }
  request.metadata = {{"model", model_config_json(config.model)}, {"saved_by", "strata"}};
  if (adapter_only_) request.metadata["adapter_only"] = {{"bases", adapter_bases_}};
  request.train_state = state.to_json({group.world_size(), optimizer_->steps_taken(),
                                       config.training.steps, config.training.global_batch_size});
  request.config_yaml = config_yaml_;
  return request;
}

CommitJob Trainer::export_job(int64_t step) {
  const bool async = config.checkpoint.async_mode == "async";
  return hf_export_job(step, plain_model_.get(), sharded_model_.get(), config,
                       tokenizer_ ? &*tokenizer_ : nullptr, group.rank(), group.world_size(),
                       /*hash_thread=*/!async, &source_layout_, source_base_);
}

const LanguageModel& Trainer::model() const {
  return sharded_ ? static_cast<const LanguageModel&>(*sharded_model_) : *plain_model_;
}

}  // namespace strata
