// Evaluation: the mean next-token cross-entropy of a model over consecutive windows of token
// files, for the trainer's validation and for `strata eval`.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "parallel/communicator.h"
#include "trainer/data/data_loader.h"
#include "trainer/model/llama.h"

namespace strata {

// Mean next-token cross-entropy of `batch` under `model` (the fused kernel when enabled).
// `per_document`: attention stays inside the batch's packed documents (its doc_start; none:
// causal over each row).
at::Tensor batch_loss(const LanguageModel& model, const TokenBatch& batch,
                      bool per_document = false);
// The sum of the next-token cross-entropy over the targets that count (the batch's loss mask;
// every target without one): what a loss averaged over all the targets of a global batch adds
// up, micro-batch by micro-batch and rank by rank, before dividing by their count.
at::Tensor batch_loss_sum(const LanguageModel& model, const TokenBatch& batch,
                          bool per_document = false);

struct EvalResult {
  double loss = 0.0;   // mean over the scored tokens
  int64_t tokens = 0;  // scored tokens
};

// The mean token loss over the first `max_windows` consecutive, non-overlapping windows of
// `data` (inputs t[kT:(k+1)T], targets t[kT+1:(k+1)T+1]; with a loss mask, over the targets it
// keeps), accumulated in fp64. The windows are
// split over the ranks of `comm` (null: this process alone); every rank runs the same number of
// forward passes (FSDP gathers need all of them): a rank without windows left repeats window 0
// and ignores it.
EvalResult evaluate(const LanguageModel& model, const TokenDataset& data, int64_t max_windows,
                    int64_t micro_batch, Communicator* comm, bool per_document = false);

}  // namespace strata
