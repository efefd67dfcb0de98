// Turns an MPI return code into a DistributedError naming the call (parallel/ internal).
#pragma once

#include <fmt/format.h>
#include <mpi.h>

#include <string>

#include "parallel/process_group.h"

namespace strata::detail {

inline void check_mpi(int code, const char* what) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  throw DistributedError(fmt::format("{} failed: {}", what, std::string(text, length)));
}

}  // namespace strata::detail
