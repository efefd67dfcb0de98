// Turns an MPI return code into a DistributedError naming the call (parallel/ internal).
#pragma once

#include <fmt/format.h>
#include <mpi.h>

#include <string>
#include <vector>

#include "parallel/process_group.h"

namespace strata::detail {

inline void check_mpi(int code, const char* what) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  throw DistributedError(fmt::format("{} failed: {}", what, std::string(text, length)));
}

// Every rank's `text` in rank order (MPI_Allgatherv over `comm`), and `text` of rank `root`
// (MPI_Bcast): the string collectives behind ProcessGroup and the communicators.
std::vector<std::string> mpi_all_gather_strings(const std::string& text, MPI_Comm comm);
std::string mpi_broadcast_string(const std::string& text, int root, MPI_Comm comm);

}  // namespace strata::detail
