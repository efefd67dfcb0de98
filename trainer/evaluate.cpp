// Evaluation over consecutive windows.
#include "trainer/evaluate.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "trainer/kernels/fused_ops.h"

namespace strata {
namespace {

// Host values (B, T) as a tensor on `device` (a copy: the batch may go away).
template <class T>
at::Tensor to_tensor(const std::vector<T>& values, int64_t batch, int64_t seq_len,
                     const at::Device& device) {
  const at::Tensor host = at::from_blob(const_cast<T*>(values.data()), {batch, seq_len},
                                        c10::CppTypeToScalarType<T>::value);
  return device.is_cpu() ? host.clone() : host.to(device);
}

// Logits in fp32, whatever the compute dtype: the loss is computed in fp32.
at::Tensor logits_of(const LanguageModel& model, const TokenBatch& batch, bool per_document) {
  const at::Device device = model.device();
  const at::Tensor inputs = to_tensor(batch.inputs, batch.batch, batch.seq_len, device);
  if (!per_document || batch.doc_start.empty()) return model.forward(inputs).to(at::kFloat);
  const DocumentMask documents =
      document_mask(to_tensor(batch.doc_start, batch.batch, batch.seq_len, device));
  return model.forward(inputs, &documents).to(at::kFloat);
}

}  // namespace

at::Tensor batch_loss(const LanguageModel& model, const TokenBatch& batch, bool per_document) {
  at::Tensor logits = logits_of(model, batch, per_document);
  at::Tensor targets = to_tensor(batch.targets, batch.batch, batch.seq_len, logits.device());
  if (fused::enabled(logits)) return fused::cross_entropy(logits.flatten(0, 1), targets.flatten());
  return at::cross_entropy_loss(logits.flatten(0, 1), targets.flatten());
}

at::Tensor batch_loss_sum(const LanguageModel& model, const TokenBatch& batch, bool per_document) {
  if (batch.loss_mask.empty()) {
    return batch_loss(model, batch, per_document)
        .mul(static_cast<double>(batch.batch * batch.seq_len));
  }
  constexpr int64_t kIgnored = -100;
  std::vector<int64_t> targets = batch.targets;
  for (size_t i = 0; i < targets.size(); ++i) {
    if (!batch.loss_mask[i]) targets[i] = kIgnored;
  }
  at::Tensor logits = logits_of(model, batch, per_document);
  return at::cross_entropy_loss(
      logits.flatten(0, 1),
      to_tensor(targets, batch.batch, batch.seq_len, logits.device()).flatten(), {},
      at::Reduction::Sum, kIgnored);
}

EvalResult evaluate(const LanguageModel& model, const TokenDataset& data, int64_t max_windows,
                    int64_t micro_batch, Communicator* comm, bool per_document) {
  at::NoGradGuard no_grad;
  const int world = comm ? comm->world_size() : 1, rank = comm ? comm->rank() : 0;
  const int64_t windows = std::min(max_windows, data.num_sequential_windows());
  const int64_t per_rank = (windows + world - 1) / world;
  const int64_t begin = rank * per_rank;
  const int64_t end = std::min(windows, begin + per_rank);
  at::Tensor sums = at::zeros({2}, at::kDouble);  // loss x tokens, tokens
  for (int64_t first = 0; first < per_rank; first += micro_batch) {
    const int64_t valid = std::clamp<int64_t>(end - (begin + first), 0, micro_batch);
    const TokenBatch batch =
        data.sequential_batch(valid > 0 ? begin + first : 0, std::max<int64_t>(valid, 1));
    if (!batch.loss_mask.empty()) {
      const double sum = batch_loss_sum(model, batch, per_document).item<double>();
      if (valid == 0) continue;  // the repeated window: run, not counted
      sums[0] += sum;
      sums[1] += static_cast<double>(batch.target_count());
      continue;
    }
    const double loss = batch_loss(model, batch, per_document).item<double>();
    const int64_t n = valid * batch.seq_len;
    sums[0] += loss * static_cast<double>(n);
    sums[1] += static_cast<double>(n);
  }
  if (comm) comm->all_reduce(sums, ReduceOp::kSum);
  const double tokens = sums[1].item<double>();
  return {tokens > 0 ? sums[0].item<double>() / tokens : 0.0, static_cast<int64_t>(tokens)};
}

}  // namespace strata
