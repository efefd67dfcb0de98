// Hybrid sharding's layout: parallel.fsdp.shard_group_size resolved against where the ranks
// run, every refusal with its message, and the start-up description.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "parallel/errors.h"
#include "parallel/shard_layout.h"

namespace strata {
namespace {

const std::vector<std::string> kHosts = {"n1", "n2", "n3"};

std::string refusal(const std::string& setting, const std::vector<int>& rank_nodes) {
  try {
    plan_shard_layout(setting, rank_nodes, kHosts);
  } catch (const DistributedError& e) {
    return e.what();
  }
  return "";
}

TEST(ShardLayout, WorldNodeAndNumbers) {
  const std::vector<int> two_by_two = {0, 0, 1, 1};
  const ShardLayout world = plan_shard_layout("world", two_by_two, kHosts);
  EXPECT_EQ(world.shard_size, 4);
  EXPECT_EQ(world.replicas(), 1);
  EXPECT_FALSE(world.hybrid());

  const ShardLayout node = plan_shard_layout("node", two_by_two, kHosts);
  EXPECT_EQ(node.shard_size, 2);
  EXPECT_EQ(node.replicas(), 2);
  EXPECT_TRUE(node.hybrid());
  // rank r: shard rank r % 2 of shard group r / 2.
  EXPECT_EQ(node.shard_group(3), 1);
  EXPECT_EQ(node.shard_rank(3), 1);
  EXPECT_EQ(node.shard_group(1), 0);

  EXPECT_EQ(plan_shard_layout("1", two_by_two, kHosts).shard_size, 1);  // pure replication
  EXPECT_EQ(plan_shard_layout("2", two_by_two, kHosts).shard_size, 2);
  EXPECT_EQ(plan_shard_layout("4", two_by_two, kHosts).shard_size, 4);
  // Groups of whole nodes: 3 nodes x 2 ranks, groups of 6 (one group) and of 2 (per node).
  EXPECT_EQ(plan_shard_layout("6", {0, 0, 1, 1, 2, 2}, kHosts).replicas(), 1);
  // One node, any divisor.
  EXPECT_EQ(plan_shard_layout("3", {0, 0, 0, 0, 0, 0}, kHosts).replicas(), 2);
}

TEST(ShardLayout, RefusesSizesThatDoNotFitTheWorldOrTheNodes) {
  EXPECT_EQ(refusal("3", {0, 0, 1, 1}),
            "parallel.fsdp.shard_group_size = 3 does not divide the world size 4\nHINT: use a "
            "divisor of 4 (world: one shard group, node: one per node)");
  EXPECT_EQ(refusal("0", {0, 0}),
            "parallel.fsdp.shard_group_size = '0' must be world, node or a positive number of "
            "ranks");
  EXPECT_EQ(refusal("two", {0, 0}),
            "parallel.fsdp.shard_group_size = 'two' must be world, node or a positive number of "
            "ranks");
  // 3 nodes x 2 ranks in groups of 3: group 0 holds node n1 and half of n2.
  EXPECT_EQ(refusal("3", {0, 0, 1, 1, 2, 2}),
            "parallel.fsdp.shard_group_size = 3: shard group 0 (ranks 0-2) holds part of node n2 "
            "(rank 3 of that node is in another shard group); ranks by node: n1 = 0-1, n2 = 2-3, "
            "n3 = 4-5\nHINT: use a size that divides the ranks per node or is a multiple of "
            "them, with ranks placed by slot (consecutive ranks per node)");
  // Ranks placed round-robin: a group of 2 consecutive ranks spans both nodes, each in part.
  EXPECT_NE(refusal("2", {0, 1, 0, 1}).find("shard group 0 (ranks 0-1) holds part of node n1"),
            std::string::npos);
  // node: uneven nodes, and nodes whose ranks are not consecutive.
  const std::string uneven = refusal("node", {0, 0, 0, 1});
  EXPECT_EQ(uneven,
            "parallel.fsdp.shard_group_size node needs the same number of ranks on every node, "
            "numbered consecutively node by node; ranks by node: n1 = 0-2, n2 = 3\nHINT: start "
            "the same number of ranks per node, placed by slot (mpirun --map-by slot, srun's "
            "default block distribution), or give the size as a number");
  EXPECT_NE(refusal("node", {0, 1, 0, 1}).find("ranks by node: n1 = 0,2, n2 = 1,3"),
            std::string::npos);
}

TEST(ShardLayout, DescribesGroupsPerNode) {
  const std::vector<int> two_by_two = {0, 0, 1, 1};
  EXPECT_EQ(plan_shard_layout("node", two_by_two, kHosts).describe(two_by_two, kHosts),
            "fsdp: hybrid sharding (shard_group_size node): 2 shard groups of 2 rank(s), "
            "replicas of each other; each rank holds 1/2 of the parameters, gradients and AdamW "
            "state; shard groups [0-1] on n1, [2-3] on n2; replica groups (gradient shards "
            "averaged once per step) [0,2], [1,3]");
  EXPECT_EQ(plan_shard_layout("world", two_by_two, kHosts).describe(two_by_two, kHosts),
            "fsdp: sharded over all 4 rank(s) (shard_group_size world): each holds 1/4 of the "
            "parameters, gradients and AdamW state");
  const std::vector<int> one_node(6, 0);
  EXPECT_EQ(plan_shard_layout("2", one_node, kHosts).describe(one_node, kHosts),
            "fsdp: hybrid sharding (shard_group_size 2): 3 shard groups of 2 rank(s), replicas "
            "of each other; each rank holds 1/2 of the parameters, gradients and AdamW state; "
            "shard groups [0-1] on n1, [2-3] on n1, [4-5] on n1; replica groups (gradient "
            "shards averaged once per step) [0,2,4], [1,3,5]");
  // Groups of whole nodes name every node they span.
  const std::vector<int> four_nodes = {0, 1, 2, 3};
  const std::vector<std::string> hosts = {"a", "b", "c", "d"};
  EXPECT_NE(plan_shard_layout("2", four_nodes, hosts)
                .describe(four_nodes, hosts)
                .find("shard groups [0-1] on a+b, [2-3] on c+d"),
            std::string::npos);
}

}  // namespace
}  // namespace strata
