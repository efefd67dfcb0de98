// all_reduce_buckets against one all_reduce per tensor, bit for bit, on 1..4 ranks (ctest runs
// this program alone and under mpirun -np 2, 3 and 4).
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <vector>

#include "parallel/bucketed.h"
#include "parallel/communicator.h"
#include "tests/common/mpi_environment.h"

namespace strata {
namespace {

using testing::MpiEnvironment;

// A gradient-like list: mixed sizes and dtypes, a non-contiguous tensor, an undefined one and
// an empty one. Values are small integers over 4, exact in every dtype and every summation
// order (the MPI library may pick another algorithm for another message size), different on
// every rank.
std::vector<at::Tensor> make_tensors(int rank) {
  at::manual_seed(1234 + rank);
  auto values = [](std::vector<int64_t> shape, at::ScalarType dtype) {
    return at::randint(-30, 31, shape, at::kLong).to(at::kDouble).div(4).to(dtype);
  };
  return {values({7, 5}, at::kFloat),     values({3}, at::kFloat),  at::Tensor(),
          values({300}, at::kFloat),  // 1200 bytes: more than the 1 KiB buckets below
          values({4, 6}, at::kFloat).t(), values({0}, at::kFloat),  values({11}, at::kBFloat16),
          values({2, 2}, at::kBFloat16),  values({5}, at::kDouble), values({9}, at::kFloat)};
}

std::vector<at::Tensor> clone_all(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& t : tensors) out.push_back(t.defined() ? t.clone() : at::Tensor());
  return out;
}

void expect_bit_equal(const std::vector<at::Tensor>& got, const std::vector<at::Tensor>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_EQ(got[i].defined(), want[i].defined()) << i;
    if (!got[i].defined()) continue;
    EXPECT_EQ(got[i].scalar_type(), want[i].scalar_type()) << i;
    EXPECT_EQ(got[i].sizes(), want[i].sizes()) << i;
    EXPECT_TRUE(at::equal(got[i], want[i])) << "tensor " << i;
  }
}

TEST(AllReduceBuckets, EqualsOneAllReducePerTensorBitForBit) {
  auto comm = make_mpi_communicator(*MpiEnvironment::group);
  for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax}) {
    for (int64_t bucket_bytes : {int64_t{1} << 10, kDefaultBucketBytes}) {
      const std::vector<at::Tensor> original = make_tensors(comm->rank());
      std::vector<at::Tensor> want = clone_all(original);
      for (at::Tensor& t : want) {
        if (!t.defined() || t.numel() == 0) continue;
        at::Tensor c = t.contiguous();
        comm->all_reduce(c, op);
        t.copy_(c);
      }
      std::vector<at::Tensor> got = clone_all(original);
      const int64_t before = comm->stats().calls;
      all_reduce_buckets(*comm, got, op, bucket_bytes);
      const int64_t calls = comm->stats().calls - before;
      expect_bit_equal(got, want);
      EXPECT_FALSE(got[4].is_contiguous());  // the results land in the caller's tensors
      // 8 non-empty tensors. 1 KiB buckets: [7x5, 3 floats] [300 floats: alone] [4x6 floats]
      // [11, 2x2 bf16] [5 doubles] [9 floats]; 25 MiB: one bucket per run of a dtype.
      if (bucket_bytes == kDefaultBucketBytes) {
        EXPECT_EQ(calls, 4);
      } else {
        EXPECT_EQ(calls, 6);
      }
      EXPECT_LT(calls, 8);
    }
  }
}

TEST(AllReduceBuckets, ABucketHoldsWhatFitsAndABigTensorGoesAlone) {
  auto comm = make_mpi_communicator(*MpiEnvironment::group);
  // Ten 100-byte tensors in 256-byte buckets: two per bucket. A 1000-byte one alone.
  std::vector<at::Tensor> tensors;
  for (int i = 0; i < 10; ++i) tensors.push_back(at::full({25}, comm->rank() + i, at::kFloat));
  tensors.insert(tensors.begin() + 5, at::full({250}, 1.0, at::kFloat));
  const int64_t before = comm->stats().calls;
  all_reduce_buckets(*comm, tensors, ReduceOp::kSum, 256);
  EXPECT_EQ(comm->stats().calls - before, 7);  // [0 1] [2 3] [4] [big] [5 6] [7 8] [9]
  const int world = comm->world_size();
  for (int i = 0; i < 10; ++i) {
    const at::Tensor& t = tensors[i < 5 ? i : i + 1];
    const double want = world * (world - 1) / 2.0 + world * i;
    EXPECT_TRUE(at::equal(t, at::full({25}, want, at::kFloat))) << i;
  }
  EXPECT_TRUE(at::equal(tensors[5], at::full({250}, static_cast<double>(world), at::kFloat)));
}

TEST(AllReduceBuckets, NothingToReduceMakesNoCall) {
  auto comm = make_mpi_communicator(*MpiEnvironment::group);
  const int64_t before = comm->stats().calls;
  all_reduce_buckets(*comm, {at::Tensor(), at::zeros({0})}, ReduceOp::kSum);
  all_reduce_buckets(*comm, {}, ReduceOp::kSum);
  EXPECT_EQ(comm->stats().calls, before);
}

}  // namespace
}  // namespace strata
