// MPI Communicator: every collective and dtype, checked exactly on 1..4 ranks (ctest runs
// this program alone and under mpirun -np 2, 3 and 4).
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <string>
#include <vector>

#include "parallel/communicator.h"
#include "tests/common/mpi_environment.h"

namespace strata {
namespace {

using testing::MpiEnvironment;

class CommunicatorTest : public ::testing::Test {
 protected:
  void SetUp() override { comm = make_mpi_communicator(*MpiEnvironment::group); }
  std::unique_ptr<Communicator> comm;
  int rank() const { return comm->rank(); }
  int world() const { return comm->world_size(); }
};

TEST_F(CommunicatorTest, AllReduceSumsEveryDtypeExactly) {
  for (at::ScalarType dtype :
       {at::kFloat, at::kDouble, at::kInt, at::kLong, at::kByte, at::kBFloat16, at::kHalf}) {
    // rank r contributes (r + 1) * [1, 2, 3]: small integers, exact in every dtype.
    at::Tensor t = at::arange(1, 4, at::kDouble).mul(rank() + 1).to(dtype);
    comm->all_reduce(t, ReduceOp::kSum);
    const double factor = world() * (world() + 1) / 2.0;
    EXPECT_TRUE(at::equal(t, at::arange(1, 4, at::kDouble).mul(factor).to(dtype)))
        << c10::toString(dtype);
  }
}

TEST_F(CommunicatorTest, AllReduceAverageMaxMin) {
  at::Tensor avg = at::full({5}, static_cast<double>(rank()), at::kFloat);
  comm->all_reduce(avg, ReduceOp::kAvg);
  EXPECT_TRUE(at::allclose(avg, at::full({5}, (world() - 1) / 2.0, at::kFloat)));
  at::Tensor max = at::full({2}, static_cast<int64_t>(rank()), at::kLong);
  comm->all_reduce(max, ReduceOp::kMax);
  EXPECT_EQ(max[0].item<int64_t>(), world() - 1);
  at::Tensor min = at::full({2}, rank() + 3.5, at::kBFloat16);
  comm->all_reduce(min, ReduceOp::kMin);
  EXPECT_EQ(min[1].item<float>(), 3.5f);
  at::Tensor ints = at::ones({1}, at::kLong);
  EXPECT_THROW(comm->all_reduce(ints, ReduceOp::kAvg), DistributedError);
}

TEST_F(CommunicatorTest, AllGatherConcatenatesInRankOrder) {
  for (at::ScalarType dtype :
       {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf, at::kLong, at::kByte}) {
    for (int64_t n : {1, 3, 7, 1000}) {  // sizes that divide nothing in particular
      at::Tensor mine = at::full({n}, rank() * 10, at::TensorOptions().dtype(dtype));
      at::Tensor all = at::empty({world() * n}, mine.options());
      comm->all_gather(mine, all);
      for (int r = 0; r < world(); ++r) {
        EXPECT_TRUE(at::equal(all.narrow(0, r * n, n), at::full({n}, r * 10, mine.options())))
            << c10::toString(dtype) << " n=" << n;
      }
    }
  }
  at::Tensor wrong = at::empty({world() * 3 + 1});
  EXPECT_THROW(comm->all_gather(at::zeros({3}), wrong), DistributedError);
}

TEST_F(CommunicatorTest, ReduceScatterGivesEachRankItsReducedChunk) {
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    // Element i of every rank's input is i + rank: chunk r sums to world * i + world(world-1)/2.
    at::Tensor input = at::arange(world() * 4, at::kDouble).add(rank()).to(dtype);
    at::Tensor output = at::empty({4}, input.options());
    comm->reduce_scatter(input, output, ReduceOp::kSum);
    at::Tensor expected = at::arange(rank() * 4, rank() * 4 + 4, at::kDouble)
                              .mul(world())
                              .add(world() * (world() - 1) / 2.0)
                              .to(dtype);
    EXPECT_TRUE(at::equal(output, expected)) << c10::toString(dtype);
    comm->reduce_scatter(input, output, ReduceOp::kAvg);
    EXPECT_TRUE(at::allclose(output.to(at::kDouble), expected.to(at::kDouble).div(world())));
  }
}

TEST_F(CommunicatorTest, AllReduceOfOddSizesAndEmptyTensors) {
  for (int64_t n : {0, 1, 7, 4097}) {
    at::Tensor t = at::full({n}, 1.0, at::kFloat);
    comm->all_reduce(t, ReduceOp::kSum);
    EXPECT_TRUE(at::equal(t, at::full({n}, static_cast<double>(world()), at::kFloat))) << n;
  }
}

TEST_F(CommunicatorTest, BroadcastCopiesTheRootsTensor) {
  const int root = world() - 1;
  at::Tensor t = rank() == root ? at::arange(6, at::kFloat) : at::zeros({6}, at::kFloat);
  comm->broadcast(t, root);
  EXPECT_TRUE(at::equal(t, at::arange(6, at::kFloat)));
}

TEST_F(CommunicatorTest, AgreeReportsTheLowestFailingRankToEveryRank) {
  EXPECT_FALSE(comm->agree(true, "").has_value());
  const int failing = world() - 1;
  auto failure = comm->agree(rank() != failing, fmt::format("disk full on rank {}", rank()));
  ASSERT_TRUE(failure.has_value());
  EXPECT_EQ(failure->rank, failing);
  EXPECT_EQ(failure->message, fmt::format("disk full on rank {}", failing));
  // Several failures: the lowest rank wins, on every rank.
  failure = comm->agree(false, fmt::format("rank {} failed", rank()));
  ASSERT_TRUE(failure.has_value());
  EXPECT_EQ(failure->rank, 0);
  EXPECT_EQ(failure->message, "rank 0 failed");
  comm->barrier();
}

// Hybrid sharding's groups: split by color, ranked by key; each part's collectives, string
// collectives, agreement and stats stay inside it.
TEST_F(CommunicatorTest, SplitGivesIndependentGroups) {
  // Pairs of consecutive ranks (shard groups of 2), and ranks of equal parity (replica groups),
  // ranked in reverse to check that `key` orders the part.
  std::unique_ptr<Communicator> pair = comm->split(rank() / 2, rank() % 2);
  std::unique_ptr<Communicator> parity = comm->split(rank() % 2, -rank());
  const int pair_size = std::min(2, world() - rank() / 2 * 2);
  const int parity_size = (world() - rank() % 2 + 1) / 2;
  EXPECT_EQ(pair->world_size(), pair_size);
  EXPECT_EQ(pair->rank(), rank() % 2);
  EXPECT_EQ(parity->world_size(), parity_size);
  EXPECT_EQ(parity->rank(), parity_size - 1 - rank() / 2);

  at::Tensor sum = at::full({3}, static_cast<double>(rank()), at::kFloat);
  pair->all_reduce(sum, ReduceOp::kSum);
  const int first = rank() / 2 * 2;
  double expected = 0;
  for (int r = first; r < first + pair_size; ++r) expected += r;
  EXPECT_TRUE(at::equal(sum, at::full({3}, expected, at::kFloat)));

  // The parity group gathers its world ranks, in the part's (reversed) order.
  at::Tensor mine = at::full({1}, static_cast<int64_t>(rank()), at::kLong);
  at::Tensor all = at::empty({parity_size}, at::kLong);
  parity->all_gather(mine, all);
  for (int i = 0; i < parity_size; ++i) {
    EXPECT_EQ(all[i].item<int64_t>(), rank() % 2 + 2 * (parity_size - 1 - i));
  }
  const std::vector<std::string> names = parity->all_gather_strings(fmt::format("r{}", rank()));
  ASSERT_EQ(static_cast<int>(names.size()), parity_size);
  EXPECT_EQ(names[parity->rank()], fmt::format("r{}", rank()));
  EXPECT_EQ(pair->broadcast_string(fmt::format("from {}", rank()), 0),
            fmt::format("from {}", first));
  const auto failure = pair->agree(pair->rank() != 0, "first of the pair");
  ASSERT_TRUE(failure.has_value());
  EXPECT_EQ(failure->rank, 0);
  // Traffic is counted where it happened: the parent saw none of it.
  EXPECT_EQ(pair->stats().calls, 1);
  EXPECT_EQ(parity->stats().calls, 1);
  EXPECT_EQ(comm->stats().calls, 0);
  comm->barrier();
}

// The async API on a synchronous backend: the collective runs inside the call, its work is
// complete, and all of its time counts as exposed.
TEST_F(CommunicatorTest, AsyncCollectivesCompleteInsideTheCallOnMpi) {
  const CommStats before = comm->stats();
  at::Tensor mine = at::full({3}, static_cast<double>(rank()), at::kBFloat16);
  at::Tensor all = at::empty({3 * world()}, mine.options());
  std::unique_ptr<CommWork> gather = comm->all_gather_async(mine, all);
  EXPECT_TRUE(gather->synchronous());
  for (int r = 0; r < world(); ++r) EXPECT_EQ(all[3 * r].item<double>(), r);
  gather->wait();
  at::Tensor input = at::ones({4 * world()}, at::kFloat);
  at::Tensor output = at::empty({4}, input.options());
  std::unique_ptr<CommWork> scatter = comm->reduce_scatter_async(input, output, ReduceOp::kAvg);
  EXPECT_TRUE(scatter->synchronous());
  scatter->wait();
  EXPECT_TRUE(at::equal(output, at::ones({4})));
  const CommStats after = comm->stats();
  EXPECT_EQ(after.calls - before.calls, 2);
  EXPECT_GT(after.exposed_seconds, before.exposed_seconds);
  EXPECT_DOUBLE_EQ(after.exposed_seconds, after.seconds);
}

TEST_F(CommunicatorTest, RejectsNonContiguousTensors) {
  at::Tensor strided = at::zeros({4, 4}).t();
  EXPECT_THROW(comm->all_reduce(strided, ReduceOp::kSum), DistributedError);
}

}  // namespace
}  // namespace strata
