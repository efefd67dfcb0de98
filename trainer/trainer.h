// Everything a run trains with, built once by Trainer's constructor (the set-up: run directory,
// data, model, optimizer, resume), and the pieces of one step that the loop in train.cpp calls:
// train_step, log_metrics, evaluate_and_sample. The Trainer is also what the CheckpointManager
// saves (Checkpointable).
#pragma once

#include <cstdint>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "checkpoint/checkpoint_manager.h"
#include "checkpoint/run_lock.h"
#include "parallel/communicator.h"
#include "parallel/process_group.h"
#include "parallel/shard_layout.h"
#include "trainer/config/config.h"
#include "trainer/data/data_loader.h"
#include "trainer/data/mixture.h"
#include "trainer/data/tokenizer.h"
#include "trainer/metrics.h"
#include "trainer/model/converters/converter.h"
#include "trainer/model/llama.h"
#include "trainer/model/sharded_llama.h"
#include "trainer/optim/adamw.h"
#include "trainer/optim/lr_schedule.h"
#include "trainer/resume.h"
#include "trainer/train.h"
#include "trainer/train_state.h"

namespace strata {

// Prints on the main rank only, one line per call.
class RunLog {
 public:
  explicit RunLog(bool enabled) : enabled_(enabled) {}
  void operator()(const std::string& line) const;
  bool enabled() const { return enabled_; }

 private:
  bool enabled_;
};

// What the host knows right after a step. The loss and the gradient norm stay on the device
// until the next log line reads them (no host synchronisation inside a step).
struct StepResult {
  double lr = 0.0;
  double seconds = 0.0;  // host time to enqueue the step (all of it on CPU)
};

class Trainer final : public Checkpointable {
  // Rank 0's lock on job.run_dir (checkpoint/run_lock.h). The first member: released after
  // everything that writes into the run directory (a background save joins on destruction).
  std::optional<RunLock> run_lock_;

 public:
  // The set-up: writes <run_dir>/config.yaml, opens the data, builds the model (whole, or FSDP
  // units) and the optimizer, resumes (plan on rank 0, load on all), initialises the rest.
  Trainer(const Config& config, const ProcessGroup& group, const TrainOptions& options);
  ~Trainer() override;

  // Opens the outputs (metrics, samples, checkpoints) once there is something to train.
  void begin();
  // One optimizer step: micro-batches (forward, backward, accumulate), gradient all-reduce
  // (replicated) or reduce-scatter (FSDP), clipping, AdamW.
  StepResult train_step(int64_t step);
  // The log line and metrics.jsonl row every log_interval steps (averaged over the window);
  // the steps' losses since the previous line join summary.losses then.
  void log_metrics(int64_t step, const StepResult& result, TrainSummary& summary);
  // Reads the losses of the steps since the previous log line (one device-to-host copy and
  // one all-reduce over the ranks) into summary.losses. log_metrics calls it; the loop calls
  // it once more when a stop ends training between log lines.
  void resolve_losses(TrainSummary& summary);
  // Validation loss and a text sample, every eval_interval steps and at the last.
  void evaluate_and_sample(int64_t step, TrainSummary& summary);
  // After the step's saves: evaluation and saving are not training step time.
  void end_step();
  int64_t tokens_per_step() const { return tokens_per_step_; }

  // Checkpointable: what a save or an HF export at `step` holds.
  SaveRequest save_request(int64_t step, bool model_only) override;
  CommitJob export_job(int64_t step) override;
  void on_writer_change() override;

  const Config config;
  const ProcessGroup& group;
  const RunLog log;
  TrainState state;  // the last completed step, the data and schedule positions, the seeds
  std::string resumed_from;
  int64_t num_parameters = 0;
  std::string checkpoint_folder;
  SavePolicy save_policy;
  std::unique_ptr<CheckpointManager> checkpoints;  // after begin()

 private:
  void setup_run_dir();
  void setup_device();
  void setup_data();
  void setup_model();
  void setup_resume(const TrainOptions& options);
  std::vector<TensorPiece> pieces_of(const AdamW* optimizer, PieceUse use) const;
  std::vector<TensorPiece> save_pieces(bool model_only) const;
  const LanguageModel& model() const;
  // Collectives on model tensors: NCCL on CUDA, else the world's MPI communicator.
  Communicator& tensor_comm() const { return device_comm_ ? *device_comm_ : *comm_; }

  int threads_ = 1;
  bool fewer_threads_ = false;
  std::optional<Tokenizer> tokenizer_;
  // data.train: one source, validated on data.val; data.sources: a mixture, validated on the
  // val sets of the sources that have one.
  std::optional<DataMixture> train_data_;
  std::optional<TokenDataset> val_data_;
  std::vector<MixtureSource> val_sources_;
  // The world over MPI: control plane (agreements, plans, checkpoints) and host tensors (the
  // losses of log lines, evaluation sums), whatever the device.
  std::unique_ptr<Communicator> comm_;
  at::Device device_ = at::kCPU;  // parallel.device: this rank's GPU (its local rank) or the CPU
  std::unique_ptr<Communicator> device_comm_;  // CUDA: NCCL over the world
  at::ScalarType param_dtype_ = at::kFloat;    // parallel.fsdp.mixed_precision
  double peak_tflops_ = 0.0;                   // per device; 0: unknown (no MFU)
  bool sharded_ = false, replicated_ = false;
  // FSDP: the units' shard group (the world, or one group of hybrid sharding) and, under
  // hybrid sharding, the replica group that averages the gradient shards once per step.
  ShardLayout layout_;
  std::unique_ptr<Communicator> shard_comm_, replica_comm_;
  std::unique_ptr<Converters> converters_;
  std::unique_ptr<AdamW> optimizer_;
  std::unique_ptr<Llama> plain_model_;
  std::unique_ptr<ShardedLlama> sharded_model_;
  std::vector<at::Tensor> params_;  // what the optimizer steps: whole tensors or flat shards
  bool adapter_only_ = false;
  nlohmann::json adapter_bases_;
  std::string source_base_;                           // the base a PEFT adapter export names
  std::map<std::string, std::string> source_layout_;  // the HF shard layout the run started from
  std::optional<LrSchedule> schedule_;
  int64_t accumulation_ = 1;
  int64_t tokens_per_step_ = 0;
  double flops_per_token_ = 0.0;
  std::unique_ptr<MetricsLogger> metrics_;
  std::unique_ptr<std::ofstream> samples_;
  std::string config_yaml_;
  std::function<void(int, int64_t)> before_write_;
  // The metrics window since the last log line.
  double window_seconds_ = 0.0;
  at::Tensor window_grad_norm_;             // the latest step's, on the device
  std::vector<at::Tensor> pending_losses_;  // per step since the last line, on the device (fp64)
  int64_t window_steps_ = 0;
  std::vector<int64_t> window_source_samples_;  // a mixture: global samples per source
  struct CommWindow {
    CommStats all, shard, replica;
  };
  CommWindow comm_stats() const;  // cumulative, of every communicator
  CommWindow window_comm_;
};

}  // namespace strata
