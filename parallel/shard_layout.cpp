// The shard-group layout of hybrid sharding: planning and the start-up description.
#include "parallel/shard_layout.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cctype>
#include <map>
#include <set>

#include "parallel/errors.h"
#include "parallel/process_group.h"

namespace strata {
namespace {

constexpr const char* kKey = "parallel.fsdp.shard_group_size";
constexpr size_t kMaxGroupsListed = 32;

std::string host_of(int node, const std::vector<std::string>& hosts) {
  return node >= 0 && node < static_cast<int>(hosts.size()) ? hosts[node]
                                                            : fmt::format("node {}", node);
}

// "n1 = 0-1, n2 = 2-3": each node's world ranks.
std::string ranks_by_node(const std::vector<int>& rank_nodes,
                          const std::vector<std::string>& hosts) {
  std::map<int, std::vector<int>> by_node;
  for (int r = 0; r < static_cast<int>(rank_nodes.size()); ++r) by_node[rank_nodes[r]].push_back(r);
  std::string out;
  for (const auto& [node, ranks] : by_node) {
    out += fmt::format("{}{} = {}", out.empty() ? "" : ", ", host_of(node, hosts),
                       compact_list(ranks));
  }
  return out;
}

std::vector<int> range(int first, int count, int stride = 1) {
  std::vector<int> out;
  for (int i = 0; i < count; ++i) out.push_back(first + i * stride);
  return out;
}

}  // namespace

ShardLayout plan_shard_layout(const std::string& setting, const std::vector<int>& rank_nodes,
                              const std::vector<std::string>& node_hosts) {
  ShardLayout layout;
  layout.setting = setting;
  layout.world_size = std::max<int>(1, static_cast<int>(rank_nodes.size()));
  const int world = layout.world_size;
  const std::string placement =
      fmt::format("ranks by node: {}", ranks_by_node(rank_nodes, node_hosts));
  if (setting == "world") {
    layout.shard_size = world;
    return layout;
  }
  if (setting == "node") {
    // Every node's ranks, a run of consecutive world ranks of the same length.
    std::map<int, std::vector<int>> by_node;
    for (int r = 0; r < world; ++r) by_node[rank_nodes[r]].push_back(r);
    const size_t per_node = by_node.begin()->second.size();
    for (const auto& [node, ranks] : by_node) {
      const bool consecutive = ranks.back() - ranks.front() + 1 == static_cast<int>(ranks.size());
      if (ranks.size() != per_node || !consecutive) {
        throw DistributedError(fmt::format(
            "{} node needs the same number of ranks on every node, numbered consecutively "
            "node by node; {}\nHINT: start the same number of ranks per node, placed by slot "
            "(mpirun --map-by slot, srun's default block distribution), or give the size as a "
            "number",
            kKey, placement));
      }
    }
    layout.shard_size = static_cast<int>(per_node);
    return layout;
  }
  const bool digits = !setting.empty() && setting.size() <= 9 &&
                      std::all_of(setting.begin(), setting.end(),
                                  [](unsigned char c) { return std::isdigit(c) != 0; });
  const int size = digits ? std::stoi(setting) : 0;
  if (size <= 0) {
    throw DistributedError(
        fmt::format("{} = '{}' must be world, node or a positive number of ranks", kKey, setting));
  }
  if (world % size != 0) {
    throw DistributedError(fmt::format(
        "{} = {} does not divide the world size {}\nHINT: use a divisor of {} (world: one "
        "shard group, node: one per node)",
        kKey, size, world, world));
  }
  layout.shard_size = size;
  // A shard group lies inside one node, or is made of whole nodes.
  for (int g = 0; g < layout.replicas(); ++g) {
    std::set<int> nodes;
    for (int r = g * size; r < (g + 1) * size; ++r) nodes.insert(rank_nodes[r]);
    if (nodes.size() == 1) continue;
    for (int r = 0; r < world; ++r) {
      if (nodes.count(rank_nodes[r]) && layout.shard_group(r) != g) {
        throw DistributedError(fmt::format(
            "{} = {}: shard group {} (ranks {}) holds part of node {} (rank {} of that node is "
            "in another shard group); {}\nHINT: use a size that divides the ranks per node or "
            "is a multiple of them, with ranks placed by slot (consecutive ranks per node)",
            kKey, size, g, compact_list(range(g * size, size)), host_of(rank_nodes[r], node_hosts),
            r, placement));
      }
    }
  }
  return layout;
}

std::string ShardLayout::describe(const std::vector<int>& rank_nodes,
                                  const std::vector<std::string>& node_hosts) const {
  if (!hybrid()) {
    return fmt::format(
        "fsdp: sharded over all {} rank(s) (shard_group_size {}): each holds 1/{} of the "
        "parameters, gradients and AdamW state",
        world_size, setting, shard_size);
  }
  std::string shards, replica_groups;
  for (int g = 0; g < replicas() && g < static_cast<int>(kMaxGroupsListed); ++g) {
    std::set<int> nodes;
    for (int r = g * shard_size; r < (g + 1) * shard_size; ++r) {
      if (r < static_cast<int>(rank_nodes.size())) nodes.insert(rank_nodes[r]);
    }
    std::string hosts;
    for (int n : nodes)
      hosts += fmt::format("{}{}", hosts.empty() ? "" : "+", host_of(n, node_hosts));
    shards += fmt::format("{}[{}] on {}", g ? ", " : "",
                          compact_list(range(g * shard_size, shard_size)), hosts);
  }
  if (replicas() > static_cast<int>(kMaxGroupsListed)) {
    shards += fmt::format(", and {} more", replicas() - static_cast<int>(kMaxGroupsListed));
  }
  for (int s = 0; s < shard_size && s < static_cast<int>(kMaxGroupsListed); ++s) {
    std::vector<int> members =
        range(s, std::min(replicas(), static_cast<int>(kMaxGroupsListed)), shard_size);
    replica_groups += fmt::format("{}[{}{}]", s ? ", " : "", fmt::join(members, ","),
                                  replicas() > static_cast<int>(kMaxGroupsListed) ? ",..." : "");
  }
  if (shard_size > static_cast<int>(kMaxGroupsListed)) {
    replica_groups += fmt::format(", and {} more", shard_size - static_cast<int>(kMaxGroupsListed));
  }
  return fmt::format(
      "fsdp: hybrid sharding (shard_group_size {}): {} shard groups of {} rank(s), replicas of "
      "each other; each rank holds 1/{} of the parameters, gradients and AdamW state; shard "
      "groups {}; replica groups (gradient shards averaged once per step) {}",
      setting, replicas(), shard_size, shard_size, shards, replica_groups);
}

}  // namespace strata
