// Where a run is: the step, the data order's position, the LR schedule's position and the
// sampling seed. TrainState owns train_state.json (docs/formats.md), the document beside a
// checkpoint's tensors: each component writes its part (dataloader, lr_scheduler, optimizer,
// rng), and resuming reads them back.
#pragma once

#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <string>

namespace strata {

struct TrainState {
  int64_t step = 0;              // the last completed optimizer step
  uint64_t data_seed = 0;        // the data order's seed
  int64_t data_step_offset = 0;  // the data order's position is step - data_step_offset
  int64_t lr_step_offset = 0;    // the schedule's position is step - lr_step_offset
  uint64_t sample_seed = 0;      // the text samples drawn at evaluation

  // A run from scratch: seeds derived from job.seed, every position at 0.
  static TrainState fresh(int64_t job_seed);

  int64_t data_step() const { return step - data_step_offset; }
  int64_t lr_step() const { return step - lr_step_offset; }

  // What one rank of `world_size` writes into a checkpoint at `step`.
  struct Context {
    int world_size = 1;
    int64_t optimizer_steps = 0;  // AdamW's steps_taken
    int64_t total_steps = 0;      // training.steps
    int64_t global_batch_size = 0;
  };
  nlohmann::json to_json(const Context& context) const;

  // The parts a checkpoint's train_state.json gives back, after checking the document against
  // its schema and the checkpoint at `step` (the step agrees, positions lie in [0, step], counts
  // are consistent). Throws CheckpointError naming the file and the field when it is missing or
  // damaged.
  struct Saved {
    int64_t optimizer_steps = 0;
    uint64_t data_seed = 0;
    int64_t data_step = 0;
    int64_t lr_step = 0;  // the schedule's position (0 where a converted model's state lacks it)
    uint64_t sample_seed = 0;
  };
  // `model_only`: the checkpoint holds weights alone (a converted model), whose state may lack
  // world_size, lr_scheduler and the dataloader's global_batch_size and samples_consumed.
  static Saved read(const std::string& step_dir, int64_t step, bool model_only = false);
  static Saved validate(const nlohmann::json& state, const std::string& path, int64_t step,
                        bool model_only = false);
};

}  // namespace strata
