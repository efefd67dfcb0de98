// Hybrid sharding (HSDP): the world as shard groups that are replicas of each other. FSDP
// shards every unit over the ranks of one shard group (parameters, gradients and AdamW state);
// the ranks that hold the same shard in every group form a replica group, over which the
// gradient shards are averaged once per step. A shard group of the whole world is plain FSDP.
//
// Shard groups are runs of consecutive world ranks: with S ranks per shard group, rank r is
// shard rank r % S of shard group r / S, and replica rank r / S of replica group r % S.
#pragma once

#include <string>
#include <vector>

namespace strata {

struct ShardLayout {
  std::string setting = "world";  // parallel.fsdp.shard_group_size as given
  int world_size = 1;
  int shard_size = 1;  // ranks per shard group

  int replicas() const { return world_size / shard_size; }
  bool hybrid() const { return replicas() > 1; }
  int shard_group(int rank) const { return rank / shard_size; }
  int shard_rank(int rank) const { return rank % shard_size; }

  // The start-up line: the mode, each shard group's ranks with the node(s) it lies on, and each
  // replica group's ranks (long lists are cut).
  std::string describe(const std::vector<int>& rank_nodes,
                       const std::vector<std::string>& node_hosts) const;
};

// The layout parallel.fsdp.shard_group_size (`setting`: "world", "node", or a positive integer
// in decimal) gives a world whose rank r runs on node rank_nodes[r] (hostnames in node_hosts).
// Throws DistributedError when the size does not divide the world, when "node" meets nodes
// with different rank counts or ranks not in consecutive runs, or when a shard group would
// hold part of a node together with ranks of another node.
ShardLayout plan_shard_layout(const std::string& setting, const std::vector<int>& rank_nodes,
                              const std::vector<std::string>& node_hosts);

}  // namespace strata
