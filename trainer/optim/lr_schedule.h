// Learning-rate schedule: linear warmup, then cosine / linear decay to min_lr_ratio * lr
// (or constant), over the run's `steps`.
#pragma once

#include <cstdint>

#include "trainer/config/config.h"

namespace strata {

class LrSchedule {
 public:
  LrSchedule(double base_lr, const LrSchedulerConfig& config, int64_t total_steps);
  // Learning rate for `step`, counted from 1 (the first update) to total_steps.
  double at(int64_t step) const;

 private:
  double base_lr_;
  LrSchedulerConfig config_;
  int64_t total_steps_;
};

}  // namespace strata
