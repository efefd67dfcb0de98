// The parallel layer's errors.
#pragma once

#include <stdexcept>

namespace strata {

// A failure of the distributed runtime (MPI or NCCL bootstrap, a collective, a disagreement).
class DistributedError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace strata
