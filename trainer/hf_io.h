// The model <-> Hugging Face directories: the HF export of the training model (a CommitJob
// for the CheckpointManager) and the shape conversions between ModelConfig and the adapter's
// LlamaShape.
#pragma once

#include <string>

#include "checkpoint/checkpoint_manager.h"
#include "checkpoint/hf_llama.h"
#include "trainer/config.h"
#include "trainer/llama.h"
#include "trainer/sharded_llama.h"
#include "trainer/tokenizer.h"

namespace strata {

LlamaShape llama_shape(const ModelConfig& config);

// The HF export of the model's current weights at `step`: collective (FSDP ranks gather one
// unit at a time and keep the converted tensors of the shard files they write). Exactly one
// of `plain` / `sharded` is set. `tokenizer` (may be null) gives bos/eos and tokenizer files.
CommitJob hf_export_job(int64_t step, const Llama* plain, const ShardedLlama* sharded,
                        const Config& config, const Tokenizer* tokenizer, int rank, int world,
                        bool hash_thread);

}  // namespace strata
