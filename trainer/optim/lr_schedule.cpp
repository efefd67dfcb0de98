// Warmup + decay learning-rate schedule.
#include "trainer/optim/lr_schedule.h"

#include <algorithm>
#include <cmath>

namespace strata {

LrSchedule::LrSchedule(double base_lr, const LrSchedulerConfig& config, int64_t total_steps)
    : base_lr_(base_lr), config_(config), total_steps_(total_steps) {}

double LrSchedule::at(int64_t step) const {
  const int64_t warmup = config_.warmup_steps;
  if (step <= warmup) return base_lr_ * static_cast<double>(step) / static_cast<double>(warmup);
  const int64_t decay_steps = total_steps_ - warmup;
  const double progress =
      decay_steps > 0 ? std::clamp(static_cast<double>(step - warmup) / decay_steps, 0.0, 1.0)
                      : 1.0;
  const double floor = config_.min_lr_ratio;
  double factor = 1.0;
  switch (config_.decay) {
    case LrDecay::kCosine:
      factor = floor + (1.0 - floor) * 0.5 * (1.0 + std::cos(M_PI * progress));
      break;
    case LrDecay::kLinear:
      factor = 1.0 - (1.0 - floor) * progress;
      break;
    case LrDecay::kNone:
      break;
  }
  return base_lr_ * factor;
}

}  // namespace strata
