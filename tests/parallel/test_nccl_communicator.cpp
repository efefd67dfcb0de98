// NCCL backend: runs only where CUDA tensors exist (a GPU and a CUDA LibTorch); skips with the
// reason otherwise. ctest runs it alone (world size 1); multi-GPU checks need a multi-GPU node.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include "parallel/nccl_communicator.h"
#include "tests/common/mpi_environment.h"

namespace strata {
namespace {

using testing::MpiEnvironment;

class NcclTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!nccl_compiled()) GTEST_SKIP() << "built without CUDA/NCCL";
    if (cuda_device_count() == 0) GTEST_SKIP() << "no GPU on this machine";
    if (!at::hasCUDA()) GTEST_SKIP() << "this LibTorch has no CUDA support";
    comm = make_nccl_communicator(*MpiEnvironment::group, MpiEnvironment::group->local_rank());
  }
  std::unique_ptr<Communicator> comm;
};

TEST_F(NcclTest, CollectivesMatchTheirDefinition) {
  const int world = comm->world_size(), rank = comm->rank();
  const auto cuda = at::TensorOptions().device(at::kCUDA, MpiEnvironment::group->local_rank());
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kLong}) {
    at::Tensor t = at::arange(1, 4, cuda.dtype(at::kDouble)).mul(rank + 1).to(dtype);
    comm->all_reduce(t, ReduceOp::kSum);
    EXPECT_TRUE(
        at::equal(t.cpu(), at::arange(1, 4, at::kDouble).mul(world * (world + 1) / 2.0).to(dtype)));
    at::Tensor mine = at::full({3}, rank, cuda.dtype(dtype));
    at::Tensor all = at::empty({3 * world}, mine.options());
    comm->all_gather(mine, all);
    for (int r = 0; r < world; ++r) EXPECT_EQ(all[3 * r].item<double>(), r);
  }
  at::Tensor input = at::ones({4 * world}, cuda.dtype(at::kFloat));
  at::Tensor output = at::empty({4}, input.options());
  comm->reduce_scatter(input, output, ReduceOp::kAvg);
  EXPECT_TRUE(at::equal(output.cpu(), at::ones({4})));
  EXPECT_FALSE(comm->agree(true, "").has_value());
  at::Tensor host = at::zeros({2});
  EXPECT_THROW(comm->all_reduce(host, ReduceOp::kSum), DistributedError);
}

// The async collectives, issued from a side stream (the current stream, not the legacy default
// one, orders them): results visible on that stream after wait(); the exposed time measured.
TEST_F(NcclTest, AsyncCollectivesFollowTheCurrentStream) {
  const int world = comm->world_size(), rank = comm->rank();
  const at::Device device(at::kCUDA,
                          static_cast<c10::DeviceIndex>(MpiEnvironment::group->local_rank()));
  c10::impl::VirtualGuardImpl impl(at::kCUDA);
  c10::StreamGuard side(impl.getStreamFromGlobalPool(device));
  const int64_t n = 1 << 20;
  at::Tensor mine = at::full({n}, rank, at::TensorOptions().device(device).dtype(at::kBFloat16));
  at::Tensor all = at::empty({n * world}, mine.options());
  std::unique_ptr<CommWork> gather = comm->all_gather_async(mine.mul(1), all);  // a temporary
  EXPECT_FALSE(gather->synchronous());
  gather->wait();
  for (int r = 0; r < world; ++r) EXPECT_EQ(all[n * r].item<double>(), r);
  at::Tensor input = at::ones({4 * world}, at::TensorOptions().device(device));
  at::Tensor output = at::empty({4}, input.options());
  std::unique_ptr<CommWork> scatter = comm->reduce_scatter_async(input, output, ReduceOp::kAvg);
  scatter->wait();
  EXPECT_TRUE(at::equal(output.cpu(), at::ones({4})));
  const CommStats stats = comm->stats();
  EXPECT_EQ(stats.calls, 2);
  EXPECT_GE(stats.exposed_seconds, 0.0);
}

TEST(NcclBackend, ReportsWhyItIsUnavailable) {
  if (nccl_compiled()) GTEST_SKIP() << "built with NCCL";
  try {
    make_nccl_communicator(*MpiEnvironment::group, 0);
    FAIL() << "expected DistributedError";
  } catch (const DistributedError& e) {
    EXPECT_NE(std::string(e.what()).find("built without CUDA and NCCL"), std::string::npos);
  }
}

}  // namespace
}  // namespace strata
