// Fault injection for the end-to-end tests, compiled only into the test build of the binary
// (strata_fault_injection: apps/strata.cpp with STRATA_FAULT_INJECTION). The production binary
// never reads these variables. The hook runs where each rank is about to write its files of a
// checkpoint save or HF export:
//   STRATA_TEST_FAIL_SAVE=RANK[@STEP]    that rank's write fails (at that step only)
//   STRATA_TEST_SLOW_SAVE=SECONDS[@STEP] every rank's write first sleeps (at that step only)
#pragma once

#include <fmt/format.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <string>
#include <thread>

#include "checkpoint/errors.h"

namespace strata::testing {

// Whether `spec` ("VALUE[@STEP]") applies at `step`; its value in `value`.
inline bool fault_applies(const char* spec, int64_t step, double* value) {
  if (!spec || !*spec) return false;
  const std::string text(spec);
  const size_t at = text.find('@');
  *value = std::atof(text.substr(0, at).c_str());
  return at == std::string::npos || std::atoll(text.c_str() + at + 1) == step;
}

inline std::function<void(int, int64_t)> fault_injection_from_environment() {
  const char* fail = std::getenv("STRATA_TEST_FAIL_SAVE");
  const char* slow = std::getenv("STRATA_TEST_SLOW_SAVE");
  if (!fail && !slow) return {};
  const std::string fail_spec = fail ? fail : "", slow_spec = slow ? slow : "";
  return [fail_spec, slow_spec](int rank, int64_t step) {
    double value = 0;
    if (fault_applies(slow_spec.c_str(), step, &value))
      std::this_thread::sleep_for(std::chrono::duration<double>(value));
    if (fault_applies(fail_spec.c_str(), step, &value) && static_cast<int>(value) == rank) {
      throw IoError(
          fmt::format("cannot write rank {} file: injected failure (STRATA_TEST_FAIL_SAVE={})",
                      rank, fail_spec));
    }
  };
}

}  // namespace strata::testing
