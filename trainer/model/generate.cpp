// Token sampling.
#include "trainer/model/generate.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <limits>

namespace strata {

std::vector<int64_t> generate(const LanguageModel& model, const std::vector<int64_t>& prompt,
                              const SamplingOptions& options) {
  at::NoGradGuard no_grad;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(options.seed);
  std::vector<int64_t> context = prompt, produced;
  const int64_t window = model.config().max_seq_len;
  for (int64_t i = 0; i < options.max_new_tokens; ++i) {
    const int64_t start = std::max<int64_t>(0, static_cast<int64_t>(context.size()) - window);
    std::vector<int64_t> tail(context.begin() + start, context.end());
    const at::Tensor tokens =
        at::tensor(tail, at::kLong).unsqueeze(0).to(model.device());  // (1, T)
    const at::Tensor logits =
        model.forward(tokens).select(1, -1).squeeze(0).to(at::kCPU, at::kFloat);  // (V)
    int64_t next;
    if (options.temperature <= 0.0) {
      next = logits.argmax().item<int64_t>();
    } else {
      at::Tensor scaled = logits.div(options.temperature).to(at::kDouble);
      if (options.top_k > 0 && options.top_k < scaled.numel()) {
        const double kth = std::get<0>(scaled.topk(options.top_k)).min().item<double>();
        scaled = scaled.masked_fill(scaled < kth, -std::numeric_limits<double>::infinity());
      }
      at::Tensor probs = at::softmax(scaled, -1);
      next = at::multinomial(probs, 1, /*replacement=*/false, gen).item<int64_t>();
    }
    produced.push_back(next);
    context.push_back(next);
    if (next == options.stop_token) break;
  }
  return produced;
}

}  // namespace strata
