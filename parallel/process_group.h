// The process layout: world size, rank, local rank and node, built once from MPI. Works under
// mpirun, under srun (PMIx), and as a singleton (the binary started alone). Everything that
// needs to know where it runs asks this object.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

#include "parallel/errors.h"

namespace strata {

class ProcessGroup {
 public:
  // Initialises MPI (if nobody has yet) and reads the layout. Local rank comes from
  // MPI_Comm_split_type(MPI_COMM_TYPE_SHARED), never from launcher environment variables.
  ProcessGroup(int* argc, char*** argv);
  ~ProcessGroup();  // finalises MPI if this object initialised it
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  int local_rank() const { return local_rank_; }
  int local_world_size() const { return local_world_size_; }
  int node_index() const { return node_index_; }
  int num_nodes() const { return num_nodes_; }
  const std::string& hostname() const { return hostname_; }
  // Hostname of every node, in node order.
  const std::vector<std::string>& node_hostnames() const { return node_hostnames_; }
  // The node index of every world rank, in rank order.
  const std::vector<int>& rank_nodes() const { return rank_nodes_; }
  bool is_main() const { return rank_ == 0; }

  // Intra-op threads for this rank: `requested` when > 0, else the CPUs this process may run
  // on, divided among the ranks of this node that share them.
  int threads_per_rank(int requested) const;

  // One line for the start-up log: world, nodes, hosts, this rank's local rank, and every
  // node's world ranks with their local ranks, as MPI reported them on each rank.
  std::string describe() const;

  void barrier() const;

  // Every rank's `text`, in rank order, on every rank (MPI over the world communicator,
  // whatever backend training uses). Used for start-up agreements such as Hub downloads.
  std::vector<std::string> all_gather_strings(const std::string& text) const;

 private:
  bool owns_mpi_ = false;
  int rank_ = 0;
  int world_size_ = 1;
  int local_rank_ = 0;
  int local_world_size_ = 1;
  int node_index_ = 0;
  int num_nodes_ = 1;
  std::string hostname_;
  std::vector<std::string> node_hostnames_;
  std::vector<int> rank_nodes_;        // node index of every world rank
  std::vector<int> rank_local_ranks_;  // local rank of every world rank
  int cpus_ = 1;                       // CPUs this process may run on
  int ranks_sharing_cpus_ = 1;         // local ranks (this one included) allowed on the same CPUs
};

// "0-3,6,8-9": runs of consecutive numbers as ranges, in the order given (rank lists in logs).
std::string compact_list(const std::vector<int>& values);

}  // namespace strata
