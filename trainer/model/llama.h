// The Llama decoder: token embedding, RMSNorm, RoPE (interleaved pairs, Meta's layout), GQA
// attention, SwiGLU FFN, optional tied output. Parameter names are the internal
// (torchtitan-style) FQNs of docs/architecture.md.
//
// Construction follows the init contract: the model is built on the meta device (shapes
// only), materialised with uninitialised storage on the target device, then whatever was
// loaded is marked and `initialize` fills only the rest. RoPE tables are non-persistent
// buffers, recomputed by `initialize`.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "trainer/config/config.h"
#include "trainer/model/state_dict.h"

namespace strata {

class Converters;

struct LlamaLayer {
  at::Tensor attention_norm;  // (D)
  at::Tensor wq, wk, wv, wo;  // (H*hd, D), (KV*hd, D), (KV*hd, D), (D, H*hd)
  at::Tensor ffn_norm;        // (D)
  at::Tensor w1, w2, w3;      // (F, D), (D, F), (F, D)
  // Converter parameters of each block linear (block_linears() order: wq wk wv wo w1 w2 w3),
  // e.g. LoRA's A and B; empty without converters.
  std::vector<std::vector<at::Tensor>> extras;

  const at::Tensor& linear(size_t index) const;  // wq, wk, wv, wo, w1, w2, w3 by index
};

// Documents packed into the rows of a batch: attention stays inside a document and RoPE
// positions restart at each one, so every document computes what it would alone.
struct DocumentMask {
  at::Tensor positions;  // (B, T) int64: each token's position in its document
  at::Tensor allowed;    // (B, 1, T, T) bool: query i may attend key j (one document, j <= i)
};
// From document-start flags (B, T), nonzero where a document starts (column 0 is one).
DocumentMask document_mask(const at::Tensor& doc_start);

// Anything that maps tokens (B, T) to next-token logits (B, T, V): the plain model, or the
// same model with sharded parameters. `documents` (may be null: causal over the whole row)
// confines attention to packed documents.
class LanguageModel {
 public:
  virtual ~LanguageModel() = default;
  virtual const ModelConfig& config() const = 0;
  // Where the model computes: inputs (tokens, document masks) go there.
  virtual at::Device device() const = 0;
  virtual at::Tensor forward(const at::Tensor& tokens,
                             const DocumentMask* documents = nullptr) const = 0;
};

class Llama : public LanguageModel {
 public:
  // Parameters on the meta device. `converters` (may be null; must outlive the model) add
  // their parameters to the block linears and change how those compute.
  explicit Llama(const ModelConfig& config, const Converters* converters = nullptr);

  const ModelConfig& config() const override { return config_; }
  at::Device device() const override { return tok_embeddings_.device(); }

  // Gives every parameter uninitialised fp32 storage on `device` (requires_grad set), and
  // computes the RoPE tables there.
  void materialize(const at::Device& device);
  // Only the RoPE tables (for a model whose parameters live elsewhere, e.g. sharded).
  void prepare_buffers(const at::Device& device);

  // Initialises every parameter whose FQN is not in `loaded` from a generator seeded by
  // (seed, fqn), so initial weights do not depend on the world size or on which other
  // tensors were loaded; recomputes the RoPE tables. Returns the FQNs it initialised.
  std::vector<std::string> initialize(uint64_t seed, const std::set<std::string>& loaded = {});

  // tokens (B, T) int64 -> logits (B, T, V) fp32.
  at::Tensor forward(const at::Tensor& tokens,
                     const DocumentMask* documents = nullptr) const override;

  // The model in pieces, with parameters given explicitly (this model's own, or views into a
  // gathered FSDP unit): embedding, one transformer block, final norm + output projection.
  at::Tensor embed(const at::Tensor& tok_embeddings, const at::Tensor& tokens) const;
  at::Tensor block(const LlamaLayer& layer, const at::Tensor& h,
                   const DocumentMask* documents = nullptr) const;
  // The LlamaLayer of block `index` from its parameters in FQN order (an FSDP unit's views).
  LlamaLayer layer_from(size_t index, const std::vector<at::Tensor>& params) const;
  const Converters* converters() const { return converters_; }
  // Whether `fqn` trains (false for base weights a converter freezes).
  bool trainable(const std::string& fqn) const;
  at::Tensor head(const at::Tensor& norm, const at::Tensor& output, const at::Tensor& h) const;

  // Visits every parameter in FQN order; the callback may replace the tensor handle.
  void for_each_parameter(const std::function<void(const std::string&, at::Tensor&)>& fn);
  // The live parameters (aliases, no copies).
  StateDict parameters() const;

  int64_t num_parameters() const;
  // Closed form, from the config alone.
  static int64_t count_parameters(const ModelConfig& config);
  // Training FLOPs per token (forward + backward) as torchtitan counts them:
  // 6 * (matmul parameters) + 12 * layers * heads * head_dim * seq_len.
  static double training_flops_per_token(const ModelConfig& config, int64_t seq_len);

 private:
  at::Tensor linear(const LlamaLayer& layer, size_t index, const at::Tensor& x) const;
  at::Tensor attention(const LlamaLayer& layer, const at::Tensor& x,
                       const DocumentMask* documents) const;
  at::Tensor feed_forward(const LlamaLayer& layer, const at::Tensor& x) const;
  at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight) const;

  ModelConfig config_;
  const Converters* converters_ = nullptr;
  // Per block linear: the FQN prefix ("layers.0.attention.wq") and the converters' extras.
  std::vector<std::vector<std::vector<std::pair<std::string, std::vector<int64_t>>>>> extra_specs_;
  at::Tensor tok_embeddings_;  // (V, D)
  std::vector<LlamaLayer> layers_;
  at::Tensor norm_;                 // (D)
  at::Tensor output_;               // (V, D); undefined when tied to tok_embeddings
  at::Tensor rope_cos_, rope_sin_;  // (max_seq_len, hd/2), not parameters
};

// Initialises one parameter in place from a generator seeded by (seed, fqn): the same values
// whether the tensor is the model's own or a temporary that is then sharded. A converter's
// parameter is initialised by its converter.
void initialize_parameter(const ModelConfig& config, const std::string& fqn, at::Tensor& param,
                          uint64_t seed, const Converters* converters = nullptr);

// RoPE tables (max_seq_len, head_dim/2): angle(t, i) = t * theta^(-2i / head_dim), computed
// in fp64 and returned in fp32.
std::pair<at::Tensor, at::Tensor> rope_tables(int64_t head_dim, int64_t max_seq_len, double theta);

// Rotates x (B, T, heads, hd), viewed as hd/2 interleaved pairs (x0, x1), by the angles of
// positions [0, T). `cos`/`sin` are rope_tables(); rows beyond T are ignored. The rotation is
// computed in fp32 and returned in x's dtype.
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
// The same at explicit positions (B, T) int64 (each < the tables' rows).
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      const at::Tensor& positions);

}  // namespace strata
