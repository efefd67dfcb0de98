// Bucketed all-reduce: pack, reduce once per bucket, unpack.
#include "parallel/bucketed.h"

#include <ATen/ATen.h>

namespace strata {
namespace {

void reduce_bucket(Communicator& comm, const std::vector<at::Tensor>& bucket, ReduceOp op) {
  if (bucket.size() == 1 && bucket.front().is_contiguous()) {
    at::Tensor alone = bucket.front();  // shares the caller's storage: reduced in place
    comm.all_reduce(alone, op);
    return;
  }
  std::vector<at::Tensor> flat_views;
  std::vector<int64_t> sizes;
  for (const at::Tensor& t : bucket) {
    flat_views.push_back(t.reshape({-1}));
    sizes.push_back(t.numel());
  }
  at::Tensor flat = at::cat(flat_views);
  comm.all_reduce(flat, op);
  std::vector<at::Tensor> results = flat.split_with_sizes(sizes);
  std::vector<at::Tensor> targets;
  for (size_t i = 0; i < bucket.size(); ++i) {
    results[i] = results[i].view(bucket[i].sizes());
    targets.push_back(bucket[i]);
  }
  at::_foreach_copy_(targets, results);  // one launch on a GPU
}

}  // namespace

void all_reduce_buckets(Communicator& comm, const std::vector<at::Tensor>& tensors, ReduceOp op,
                        int64_t bucket_bytes) {
  std::vector<at::Tensor> bucket;
  int64_t bytes = 0;
  for (const at::Tensor& t : tensors) {
    if (!t.defined() || t.numel() == 0) continue;
    const int64_t size = static_cast<int64_t>(t.nbytes());
    const bool fits = !bucket.empty() && bucket.front().scalar_type() == t.scalar_type() &&
                      bucket.front().device() == t.device() && bytes + size <= bucket_bytes;
    if (!bucket.empty() && !fits) {
      reduce_bucket(comm, bucket, op);
      bucket.clear();
      bytes = 0;
    }
    bucket.push_back(t);
    bytes += size;
  }
  if (!bucket.empty()) reduce_bucket(comm, bucket, op);
}

}  // namespace strata
