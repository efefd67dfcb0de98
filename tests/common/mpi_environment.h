// MPI for a whole gtest program (MPI cannot be initialised twice in one process). Include
// from exactly one test file of an executable; tests reach the layout via MpiEnvironment::group.
#pragma once

#include <gtest/gtest.h>

#include <memory>

#include "parallel/process_group.h"

namespace strata::testing {

class MpiEnvironment : public ::testing::Environment {
 public:
  void SetUp() override { group = std::make_unique<ProcessGroup>(nullptr, nullptr); }
  void TearDown() override { group.reset(); }
  static inline std::unique_ptr<ProcessGroup> group;
};

inline const auto* const kMpiEnvironment = ::testing::AddGlobalTestEnvironment(new MpiEnvironment);

}  // namespace strata::testing
