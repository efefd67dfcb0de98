// Llama model: parameters, initialisation, forward.
#include "trainer/model/llama.h"

#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>

#include <cmath>
#include <optional>

#include "trainer/model/converters/converter.h"
#include "trainer/kernels/fused_ops.h"
#include "trainer/seed.h"

namespace strata {
namespace {

// Normal(0, std) truncated to [lo, hi] by inverse-CDF sampling (what torch.nn.init does).
void trunc_normal_(at::Tensor& t, double std, double lo, double hi, at::Generator& gen) {
  auto cdf = [](double x) { return 0.5 * (1.0 + std::erf(x / std::sqrt(2.0))); };
  const double l = cdf(lo / std), u = cdf(hi / std);
  t.uniform_(2 * l - 1, 2 * u - 1, gen).erfinv_().mul_(std * std::sqrt(2.0)).clamp_(lo, hi);
}

}  // namespace

const at::Tensor& LlamaLayer::linear(size_t index) const {
  const at::Tensor* weights[] = {&wq, &wk, &wv, &wo, &w1, &w2, &w3};
  return *weights[index];
}

Llama::Llama(const ModelConfig& config, const Converters* converters)
    : config_(config), converters_(converters) {
  const auto meta = at::TensorOptions().device(at::kMeta).dtype(at::kFloat);
  const int64_t d = config.dim, v = config.vocab_size, hd = config.head_dim();
  const int64_t f = config.ffn_hidden_dim();
  tok_embeddings_ = at::empty({v, d}, meta);
  for (int64_t i = 0; i < config.n_layers; ++i) {
    LlamaLayer layer;
    layer.attention_norm = at::empty({d}, meta);
    layer.wq = at::empty({config.n_heads * hd, d}, meta);
    layer.wk = at::empty({config.n_kv_heads * hd, d}, meta);
    layer.wv = at::empty({config.n_kv_heads * hd, d}, meta);
    layer.wo = at::empty({d, config.n_heads * hd}, meta);
    layer.ffn_norm = at::empty({d}, meta);
    layer.w1 = at::empty({f, d}, meta);
    layer.w2 = at::empty({d, f}, meta);
    layer.w3 = at::empty({f, d}, meta);
    std::vector<std::vector<std::pair<std::string, std::vector<int64_t>>>> specs;
    for (size_t j = 0; j < block_linears().size(); ++j) {
      const std::string& name = block_linears()[j];
      const std::string prefix =
          fmt::format("layers.{}.{}.{}", i, j < 4 ? "attention" : "feed_forward", name);
      const at::Tensor& w = layer.linear(j);
      specs.push_back(converters ? converters->extra_parameters(prefix, name, w.size(0), w.size(1))
                                 : std::vector<std::pair<std::string, std::vector<int64_t>>>());
      layer.extras.emplace_back();
      for (const auto& spec : specs.back())
        layer.extras.back().push_back(at::empty(spec.second, meta));
    }
    extra_specs_.push_back(std::move(specs));
    layers_.push_back(std::move(layer));
  }
  norm_ = at::empty({d}, meta);
  if (!config.tie_embeddings) output_ = at::empty({v, d}, meta);
}

void Llama::for_each_parameter(const std::function<void(const std::string&, at::Tensor&)>& fn) {
  fn("tok_embeddings.weight", tok_embeddings_);
  for (size_t i = 0; i < layers_.size(); ++i) {
    LlamaLayer& l = layers_[i];
    const std::string p = fmt::format("layers.{}.", i);
    fn(p + "attention_norm.weight", l.attention_norm);
    fn(p + "attention.wq.weight", l.wq);
    fn(p + "attention.wk.weight", l.wk);
    fn(p + "attention.wv.weight", l.wv);
    fn(p + "attention.wo.weight", l.wo);
    fn(p + "ffn_norm.weight", l.ffn_norm);
    fn(p + "feed_forward.w1.weight", l.w1);
    fn(p + "feed_forward.w2.weight", l.w2);
    fn(p + "feed_forward.w3.weight", l.w3);
    for (size_t j = 0; j < l.extras.size(); ++j) {
      for (size_t e = 0; e < l.extras[j].size(); ++e)
        fn(extra_specs_[i][j][e].first, l.extras[j][e]);
    }
  }
  fn("norm.weight", norm_);
  if (output_.defined()) fn("output.weight", output_);
}

StateDict Llama::parameters() const {
  StateDict sd;
  const_cast<Llama*>(this)->for_each_parameter(
      [&](const std::string& fqn, at::Tensor& t) { sd.insert(fqn, t); });
  return sd;
}

bool Llama::trainable(const std::string& fqn) const {
  return !converters_ || converters_->trainable(fqn);
}

LlamaLayer Llama::layer_from(size_t index, const std::vector<at::Tensor>& p) const {
  LlamaLayer layer{p.at(0), p.at(1), p.at(2), p.at(3), p.at(4),
                   p.at(5), p.at(6), p.at(7), p.at(8), {}};
  size_t next = 9;
  for (const auto& specs : extra_specs_.at(index)) {
    layer.extras.emplace_back();
    for (size_t e = 0; e < specs.size(); ++e) layer.extras.back().push_back(p.at(next++));
  }
  return layer;
}

void Llama::materialize(const at::Device& device) {
  const auto options = at::TensorOptions().device(device).dtype(at::kFloat);
  for_each_parameter([&](const std::string& fqn, at::Tensor& t) {
    t = at::empty(t.sizes(), options).requires_grad_(trainable(fqn));
  });
  prepare_buffers(device);
}

void Llama::prepare_buffers(const at::Device& device) {
  auto [cos, sin] = rope_tables(config_.head_dim(), config_.max_seq_len, config_.rope_theta);
  rope_cos_ = cos.to(device);
  rope_sin_ = sin.to(device);
}

void initialize_parameter(const ModelConfig& config, const std::string& fqn, at::Tensor& param,
                          uint64_t seed, const Converters* converters) {
  // torchtitan's scheme: N(0, 1) embeddings, N(0, 0.02) input projections, depth-scaled
  // output projections, ones for norms, and dim^-0.5 truncated at 3 sigma for the output.
  const double depth_base = 0.02;
  const double out_std = 1.0 / std::sqrt(static_cast<double>(config.dim));
  at::NoGradGuard no_grad;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(derive_seed(seed, fqn));
  at::Tensor value = at::empty(param.sizes(), at::TensorOptions().dtype(at::kFloat));
  if (const ModelConverter* owner = converters ? converters->owner(fqn) : nullptr) {
    owner->initialize(fqn, value, gen);
  } else if (fqn.find("norm.weight") != std::string::npos) {
    value.fill_(1.0);
  } else if (fqn == "tok_embeddings.weight") {
    // A tied embedding doubles as the output projection, so it takes the output's scale.
    if (config.tie_embeddings) {
      trunc_normal_(value, out_std, -3 * out_std, 3 * out_std, gen);
    } else {
      value.normal_(0.0, 1.0, gen);
    }
  } else if (fqn == "output.weight") {
    trunc_normal_(value, out_std, -3 * out_std, 3 * out_std, gen);
  } else {
    const int64_t layer = std::stoll(fqn.substr(fqn.find('.') + 1));
    const bool depth_scaled = fqn.find(".wo.") != std::string::npos ||
                              fqn.find(".w2.") != std::string::npos ||
                              fqn.find(".w3.") != std::string::npos;
    const double std = depth_scaled ? depth_base / std::sqrt(2.0 * (layer + 1)) : depth_base;
    trunc_normal_(value, std, -2.0, 2.0, gen);
  }
  param.copy_(value);
}

std::vector<std::string> Llama::initialize(uint64_t seed, const std::set<std::string>& loaded) {
  std::vector<std::string> initialised;
  for_each_parameter([&](const std::string& fqn, at::Tensor& param) {
    if (loaded.count(fqn)) return;
    if (param.device().is_meta()) {
      throw std::logic_error("Llama::initialize before materialize: " + fqn);
    }
    initialize_parameter(config_, fqn, param, seed, converters_);
    initialised.push_back(fqn);
  });
  prepare_buffers(device());
  return initialised;
}

at::Tensor Llama::rms_norm(const at::Tensor& x, const at::Tensor& weight) const {
  if (fused::enabled(x)) return fused::rms_norm(x, weight, config_.norm_eps);
  // The statistics in fp32 whatever the compute dtype (bf16 under mixed precision).
  const at::Tensor x32 = x.to(at::kFloat);
  const at::Tensor rms = at::rsqrt(x32.pow(2).mean(-1, /*keepdim=*/true).add(config_.norm_eps));
  return (x32 * rms).to(x.scalar_type()) * weight;
}

std::pair<at::Tensor, at::Tensor> rope_tables(int64_t head_dim, int64_t max_seq_len, double theta) {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor inv_freq =
      at::pow(theta, at::arange(0, head_dim, 2, f64).div(static_cast<double>(head_dim)))
          .reciprocal();
  at::Tensor angles = at::outer(at::arange(max_seq_len, f64), inv_freq);
  return {angles.cos().to(at::kFloat), angles.sin().to(at::kFloat)};
}

namespace {
// x (..., hd) viewed as hd/2 interleaved pairs (x0, x1), each rotated by the angle whose cosine
// and sine `cos` and `sin` (broadcast to (..., hd/2)) hold.
at::Tensor rotate_pairs(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  at::Tensor pairs = x.to(at::kFloat).unflatten(-1, {-1, 2});  // (..., hd/2, 2)
  at::Tensor x0 = pairs.select(-1, 0), x1 = pairs.select(-1, 1);
  return at::stack({x0 * cos - x1 * sin, x0 * sin + x1 * cos}, -1).flatten(-2).to(x.scalar_type());
}
}  // namespace

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos_table,
                      const at::Tensor& sin_table) {
  const int64_t seq_len = x.size(1);  // positions [0, T): rows (T, 1, hd/2)
  return rotate_pairs(x, cos_table.narrow(0, 0, seq_len).unsqueeze(1),
                      sin_table.narrow(0, 0, seq_len).unsqueeze(1));
}

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos_table, const at::Tensor& sin_table,
                      const at::Tensor& positions) {
  const at::Tensor flat = positions.flatten();  // rows (B, T, 1, hd/2)
  return rotate_pairs(x, cos_table.index_select(0, flat).view({x.size(0), x.size(1), 1, -1}),
                      sin_table.index_select(0, flat).view({x.size(0), x.size(1), 1, -1}));
}

DocumentMask document_mask(const at::Tensor& doc_start) {
  const at::Tensor starts = doc_start.to(at::kLong);
  const int64_t t = starts.size(1);
  const at::Tensor index = at::arange(t, starts.options()).expand_as(starts);
  // A token's document starts at the last start at or before it; ids number the documents.
  const at::Tensor first = std::get<0>(at::cummax(index * starts, 1));
  const at::Tensor ids = starts.cumsum(1);
  const at::Tensor causal = at::ones({t, t}, starts.options().dtype(at::kBool)).tril();
  return {index - first, ids.unsqueeze(2).eq(ids.unsqueeze(1)).logical_and(causal).unsqueeze(1)};
}

at::Tensor Llama::linear(const LlamaLayer& layer, size_t index, const at::Tensor& x) const {
  if (!converters_ || converters_->empty()) return at::linear(x, layer.linear(index));
  return converters_->linear(block_linears()[index], x, layer.linear(index),
                             layer.extras.at(index));
}

at::Tensor Llama::attention(const LlamaLayer& layer, const at::Tensor& x,
                            const DocumentMask* documents) const {
  const int64_t b = x.size(0), t = x.size(1), hd = config_.head_dim();
  const int64_t h = config_.n_heads, kv = config_.n_kv_heads;
  // The fused kernel is causal over the whole row; packed documents take ATen's path.
  if (!documents && fused::enabled(x) && fused::has_blas()) {
    at::Tensor q, k, v;
    if (!converters_ || converters_->empty()) {  // one GEMM for the three projections
      std::tie(q, k, v) = fused::qkv_rope(at::linear(x, at::cat({layer.wq, layer.wk, layer.wv})), h,
                                          kv, rope_cos_, rope_sin_);
    } else {
      q = fused::rope(linear(layer, 0, x).view({b, t, h, hd}), rope_cos_, rope_sin_);
      k = fused::rope(linear(layer, 1, x).view({b, t, kv, hd}), rope_cos_, rope_sin_);
      v = linear(layer, 2, x).view({b, t, kv, hd});
    }
    return linear(layer, 3, fused::causal_attention(q, k, v).view({b, t, h * hd}));
  }
  const auto rope = [&](const at::Tensor& y) {
    return documents ? apply_rope(y, rope_cos_, rope_sin_, documents->positions)
                     : apply_rope(y, rope_cos_, rope_sin_);
  };
  at::Tensor q = rope(linear(layer, 0, x).view({b, t, h, hd}));
  at::Tensor k = rope(linear(layer, 1, x).view({b, t, kv, hd}));
  at::Tensor v = linear(layer, 2, x).view({b, t, kv, hd});
  // GQA: query head j uses key/value head j / (h / kv), without copies (enable_gqa).
  std::optional<at::Tensor> mask;
  if (documents) mask = documents->allowed;
  at::Tensor y = at::scaled_dot_product_attention(
      q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, /*dropout_p=*/0.0,
      /*is_causal=*/!documents, /*scale=*/std::nullopt, /*enable_gqa=*/kv != h);  // (B, H, T, hd)
  return linear(layer, 3, y.transpose(1, 2).reshape({b, t, h * hd}));
}

at::Tensor Llama::feed_forward(const LlamaLayer& layer, const at::Tensor& x) const {
  if (fused::enabled(x)) {
    if (!converters_ || converters_->empty()) {  // one GEMM for w1 and w3
      return at::linear(fused::swiglu(at::linear(x, at::cat({layer.w1, layer.w3}))), layer.w2);
    }
    return linear(layer, 5, fused::swiglu(linear(layer, 4, x), linear(layer, 6, x)));
  }
  return linear(layer, 5, at::silu(linear(layer, 4, x)) * linear(layer, 6, x));
}

at::Tensor Llama::embed(const at::Tensor& tok_embeddings, const at::Tensor& tokens) const {
  return at::embedding(tok_embeddings, tokens);  // (B, T, D)
}

at::Tensor Llama::block(const LlamaLayer& layer, const at::Tensor& h,
                        const DocumentMask* documents) const {
  at::Tensor x = h + attention(layer, rms_norm(h, layer.attention_norm), documents);
  return x + feed_forward(layer, rms_norm(x, layer.ffn_norm));
}

at::Tensor Llama::head(const at::Tensor& norm, const at::Tensor& output,
                       const at::Tensor& h) const {
  return at::linear(rms_norm(h, norm), output);  // (B, T, V)
}

at::Tensor Llama::forward(const at::Tensor& tokens, const DocumentMask* documents) const {
  at::Tensor h = embed(tok_embeddings_, tokens);
  for (const LlamaLayer& layer : layers_) h = block(layer, h, documents);
  return head(norm_, output_.defined() ? output_ : tok_embeddings_, h);
}

int64_t Llama::num_parameters() const {
  int64_t n = 0;
  for (const auto& entry : parameters()) n += entry.second.numel();
  return n;
}

int64_t Llama::count_parameters(const ModelConfig& c) {
  const int64_t hd = c.head_dim(), f = c.ffn_hidden_dim();
  const int64_t attention = c.dim * c.n_heads * hd * 2 + c.dim * c.n_kv_heads * hd * 2;
  const int64_t per_layer = attention + 3 * c.dim * f + 2 * c.dim;
  const int64_t embeddings = c.vocab_size * c.dim * (c.tie_embeddings ? 1 : 2);
  return embeddings + c.n_layers * per_layer + c.dim;
}

double Llama::training_flops_per_token(const ModelConfig& c, int64_t seq_len) {
  // The embedding lookup is not a matmul; the output projection is (tied or not).
  const double matmul_params =
      static_cast<double>(count_parameters(c) - c.vocab_size * c.dim * (c.tie_embeddings ? 0 : 1));
  return 6.0 * matmul_params +
         12.0 * c.n_layers * c.n_heads * c.head_dim() * static_cast<double>(seq_len);
}

}  // namespace strata
