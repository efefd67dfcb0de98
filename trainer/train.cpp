// The training loop, top to bottom. The set-up and the step are the Trainer's
// (trainer/trainer.h); the save policy is the CheckpointManager's (maybe_save).
#include "trainer/train.h"

#include <fmt/format.h>

#include "trainer/metrics.h"
#include "trainer/signals.h"
#include "trainer/trainer.h"

namespace strata {

TrainSummary train(const Config& config, const ProcessGroup& group, const TrainOptions& options) {
  Trainer trainer(config, group, options);
  const TrainingConfig& tc = config.training;
  const CheckpointConfig& kc = config.checkpoint;
  TrainSummary summary;
  summary.num_parameters = trainer.num_parameters;
  summary.start_step = trainer.state.step;
  summary.resumed_from = trainer.resumed_from;
  if (summary.start_step >= tc.steps) {
    trainer.log(fmt::format(
        "done: the run is already at step {} >= training.steps {}; nothing to train (raise "
        "training.steps to continue, or use another job.run_dir to start over)",
        summary.start_step, tc.steps));
    return summary;
  }
  trainer.begin();
  install_stop_signal_handlers();

  int64_t last_step = summary.start_step;
  for (int64_t step = summary.start_step + 1; step <= tc.steps; ++step) {
    const StepResult result = trainer.train_step(step);
    last_step = step;
    summary.train_seconds += result.seconds;
    trainer.log_metrics(step, result, summary);
    if (tc.eval_interval > 0 && (step % tc.eval_interval == 0 || step == tc.steps)) {
      trainer.evaluate_and_sample(step, summary);
    }
    // Step boundary: commit a finished background save, agree on stop signals, save.
    summary.stopped = trainer.checkpoints->maybe_save(
        step, step == tc.steps, stop_requested(), stop_signal_name(), trainer.save_policy, trainer);
    if (summary.stopped) break;
    trainer.end_step();
  }
  trainer.checkpoints->finish();
  trainer.resolve_losses(summary);  // a stop between log lines

  const int64_t trained = last_step - summary.start_step;
  summary.tokens_per_s =
      summary.train_seconds > 0
          ? trainer.tokens_per_step() * static_cast<double>(trained) / summary.train_seconds
          : 0.0;
  trainer.log(fmt::format(
      "{}: {} steps (to step {}) in {:.1f} s, {:.0f} tokens/s, peak memory {:.0f} MiB{}",
      summary.stopped ? "stopped" : "done", trained, last_step, summary.train_seconds,
      summary.tokens_per_s, peak_resident_memory_mb(),
      summary.val_losses.empty()
          ? std::string()
          : fmt::format(", final val_loss {:.4f}", summary.val_losses.back().second)));
  if (summary.stopped && kc.enable) {
    trainer.log(fmt::format(
        "stop: checkpoint step {} committed; relaunch the same command to resume", last_step));
  }
  trainer.log(fmt::format("outputs: {} (config.yaml, {}, samples.txt{})", config.job.run_dir,
                          config.logging.metrics_file,
                          kc.enable ? ", " + trainer.checkpoint_folder : std::string()));
  return summary;
}

}  // namespace strata
