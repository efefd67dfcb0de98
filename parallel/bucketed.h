// Bucketed all-reduce for replicated data parallelism: many small tensors (a model's
// gradients) reduced in a few large collectives instead of one each, as DDP's gradient buckets.
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <vector>

#include "parallel/communicator.h"

namespace strata {

// DDP's default bucket size: 25 MiB.
inline constexpr int64_t kDefaultBucketBytes = int64_t{25} << 20;

// Reduces every tensor of `tensors` in place across the ranks of `comm`, as comm.all_reduce on
// each would (the reduction is elementwise, so the results are bit-identical), in fewer
// collectives: runs of consecutive tensors of one dtype and device are packed into flat buckets
// of at most `bucket_bytes`, one all_reduce per bucket, and the results copied back. A tensor
// larger than a bucket is reduced alone (in place when contiguous, without a copy). Undefined
// and empty tensors are skipped. Collective: every rank passes the same list (shapes, dtypes,
// the same tensors defined) in the same order. `tensors` are handles: the data they share is
// what changes.
void all_reduce_buckets(Communicator& comm, const std::vector<at::Tensor>& tensors, ReduceOp op,
                        int64_t bucket_bytes = kDefaultBucketBytes);

}  // namespace strata
