// MPI bootstrap and the process layout.
#include "parallel/process_group.h"

#include <fmt/format.h>
#include <mpi.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "parallel/mpi_check.h"

namespace strata {
using detail::check_mpi;

ProcessGroup::ProcessGroup(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    // The background checkpoint writer (a later addition) may call MPI off the main thread.
    check_mpi(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided), "MPI_Init_thread");
    owns_mpi_ = true;
  }
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  check_mpi(MPI_Comm_rank(MPI_COMM_WORLD, &rank_), "MPI_Comm_rank");
  check_mpi(MPI_Comm_size(MPI_COMM_WORLD, &world_size_), "MPI_Comm_size");

  MPI_Comm local = MPI_COMM_NULL;
  check_mpi(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &local),
            "MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)");
  MPI_Comm_rank(local, &local_rank_);
  MPI_Comm_size(local, &local_world_size_);

  char name[MPI_MAX_PROCESSOR_NAME] = {};
  int name_length = 0;
  MPI_Get_processor_name(name, &name_length);
  hostname_.assign(name, name_length);

  // Node index = rank of this node's leader among all leaders, in world-rank order.
  MPI_Comm leaders = MPI_COMM_NULL;
  check_mpi(MPI_Comm_split(MPI_COMM_WORLD, local_rank_ == 0 ? 0 : MPI_UNDEFINED, rank_, &leaders),
            "MPI_Comm_split(node leaders)");
  if (leaders != MPI_COMM_NULL) {
    MPI_Comm_rank(leaders, &node_index_);
    MPI_Comm_size(leaders, &num_nodes_);
  }
  MPI_Bcast(&node_index_, 1, MPI_INT, 0, local);
  MPI_Bcast(&num_nodes_, 1, MPI_INT, 0, local);

  std::vector<char> all_names(static_cast<size_t>(num_nodes_) * MPI_MAX_PROCESSOR_NAME, 0);
  if (leaders != MPI_COMM_NULL) {
    MPI_Allgather(name, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, all_names.data(), MPI_MAX_PROCESSOR_NAME,
                  MPI_CHAR, leaders);
    MPI_Comm_free(&leaders);
  }
  MPI_Bcast(all_names.data(), static_cast<int>(all_names.size()), MPI_CHAR, 0, local);
  for (int n = 0; n < num_nodes_; ++n) {
    node_hostnames_.emplace_back(all_names.data() +
                                 static_cast<size_t>(n) * MPI_MAX_PROCESSOR_NAME);
  }

  // Every rank's node and local rank, for the start-up report.
  int placement[2] = {node_index_, local_rank_};
  std::vector<int> placements(2 * static_cast<size_t>(world_size_));
  check_mpi(MPI_Allgather(placement, 2, MPI_INT, placements.data(), 2, MPI_INT, MPI_COMM_WORLD),
            "MPI_Allgather(rank placement)");
  for (int r = 0; r < world_size_; ++r) {
    rank_nodes_.push_back(placements[2 * static_cast<size_t>(r)]);
    rank_local_ranks_.push_back(placements[2 * static_cast<size_t>(r) + 1]);
  }

  // How many ranks of this node may run on exactly the CPUs this rank may run on: they share
  // those cores (e.g. no binding), so the default thread count divides them.
  cpu_set_t mine;
  CPU_ZERO(&mine);
  sched_getaffinity(0, sizeof(mine), &mine);
  std::vector<cpu_set_t> sets(local_world_size_);
  MPI_Allgather(&mine, sizeof(cpu_set_t), MPI_BYTE, sets.data(), sizeof(cpu_set_t), MPI_BYTE,
                local);
  cpus_ = std::max(1, CPU_COUNT(&mine));
  ranks_sharing_cpus_ = static_cast<int>(std::count_if(
      sets.begin(), sets.end(), [&](const cpu_set_t& s) { return CPU_EQUAL(&s, &mine); }));
  MPI_Comm_free(&local);
}

ProcessGroup::~ProcessGroup() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (owns_mpi_ && !finalized) MPI_Finalize();
}

int ProcessGroup::threads_per_rank(int requested) const {
  if (requested > 0) return requested;
  return std::max(1, cpus_ / std::max(1, ranks_sharing_cpus_));
}

std::string compact_list(const std::vector<int>& values) {
  std::string out;
  for (size_t i = 0; i < values.size();) {
    size_t j = i;
    while (j + 1 < values.size() && values[j + 1] == values[j] + 1) ++j;
    out += fmt::format("{}{}", out.empty() ? "" : ",", values[i]);
    if (j > i) out += fmt::format("-{}", values[j]);
    i = j + 1;
  }
  return out;
}

std::string ProcessGroup::describe() const {
  std::string hosts;
  for (size_t i = 0; i < node_hostnames_.size(); ++i) {
    hosts += fmt::format("{}{}", i ? ", " : "", node_hostnames_[i]);
  }
  // Each node's world ranks and their local ranks, in world-rank order (a long list is cut).
  constexpr int kMaxNodesListed = 32;
  std::string by_node;
  for (int n = 0; n < num_nodes_ && n < kMaxNodesListed; ++n) {
    std::vector<int> ranks, locals;
    for (int r = 0; r < static_cast<int>(rank_nodes_.size()); ++r) {
      if (rank_nodes_[r] != n) continue;
      ranks.push_back(r);
      locals.push_back(rank_local_ranks_[r]);
    }
    by_node += fmt::format("{}{} = {} (local {})", n ? ", " : "", node_hostnames_.at(n),
                           compact_list(ranks), compact_list(locals));
  }
  if (num_nodes_ > kMaxNodesListed) {
    by_node += fmt::format(", and {} more node(s)", num_nodes_ - kMaxNodesListed);
  }
  return fmt::format(
      "world {} rank(s) on {} node(s) [{}]; rank {} is local rank {}/{} on {}; ranks by node: {}",
      world_size_, num_nodes_, hosts, rank_, local_rank_, local_world_size_, hostname_, by_node);
}

void ProcessGroup::barrier() const {
  check_mpi(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier");
}

std::vector<std::string> detail::mpi_all_gather_strings(const std::string& text, MPI_Comm comm) {
  int size = 1;
  check_mpi(MPI_Comm_size(comm, &size), "MPI_Comm_size");
  const int mine = static_cast<int>(text.size());
  std::vector<int> sizes(size), offsets(size);
  detail::check_mpi(MPI_Allgather(&mine, 1, MPI_INT, sizes.data(), 1, MPI_INT, comm),
                    "MPI_Allgather");
  int total = 0;
  for (int r = 0; r < size; ++r) {
    offsets[r] = total;
    total += sizes[r];
  }
  std::vector<char> all(static_cast<size_t>(std::max(total, 1)));
  detail::check_mpi(MPI_Allgatherv(text.data(), mine, MPI_CHAR, all.data(), sizes.data(),
                                   offsets.data(), MPI_CHAR, comm),
                    "MPI_Allgatherv");
  std::vector<std::string> out;
  for (int r = 0; r < size; ++r)
    out.emplace_back(all.data() + offsets[r], static_cast<size_t>(sizes[r]));
  return out;
}

std::string detail::mpi_broadcast_string(const std::string& text, int root, MPI_Comm comm) {
  int rank = 0;
  check_mpi(MPI_Comm_rank(comm, &rank), "MPI_Comm_rank");
  long length = rank == root ? static_cast<long>(text.size()) : 0;
  check_mpi(MPI_Bcast(&length, 1, MPI_LONG, root, comm), "MPI_Bcast");
  std::string out = rank == root ? text : std::string(static_cast<size_t>(length), '\0');
  check_mpi(MPI_Bcast(out.data(), static_cast<int>(length), MPI_CHAR, root, comm), "MPI_Bcast");
  return out;
}

std::vector<std::string> ProcessGroup::all_gather_strings(const std::string& text) const {
  return detail::mpi_all_gather_strings(text, MPI_COMM_WORLD);
}

}  // namespace strata
