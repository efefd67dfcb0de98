// Training metrics: the human log line and the same numbers as one JSON object per line in
// <run_dir>/metrics.jsonl. Only the main rank writes.
#pragma once

#include <cstdint>
#include <fstream>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace strata {

struct StepMetrics {
  int64_t step = 0;
  int64_t total_steps = 0;
  double loss = 0.0;
  double grad_norm = 0.0;
  double lr = 0.0;
  double tokens_per_s = 0.0;  // global
  double tflops = 0.0;        // achieved model TFLOP/s (global)
  std::optional<double> mfu;  // fraction of peak, when logging.peak_tflops is set
  double step_ms = 0.0;
  // CPU: resident set size of this process. CUDA: the caching allocator's peak allocated
  // memory since the previous line, with its peak reserved memory in mem_reserved_mb.
  double mem_mb = 0.0;
  std::optional<double> mem_reserved_mb;
  double eta_s = 0.0;
  std::optional<double> comm_fraction;  // share of step time inside collectives (several ranks)
  // Share of step time the computation waited for communication (not overlapped): on CPU/MPI
  // every collective; on CUDA/NCCL the stream waits, timed with CUDA events.
  std::optional<double> comm_exposed_fraction;
  std::optional<double> comm_mb;  // MB moved per step per rank (ring algorithms)
  // FSDP: the part of comm_mb within this rank's shard group (all-gathers, reduce-scatters)
  // and across its replica group (the gradient-shard all-reduce of hybrid sharding; 0 without).
  std::optional<double> comm_mb_shard, comm_mb_replica;
  // A mixture of data sources: the tokens each source gave since the previous line (empty
  // with one source).
  std::vector<std::pair<std::string, int64_t>> tokens_by_source;
};

class MetricsLogger {
 public:
  // `path` empty: no file. Truncates an existing file (a fresh run starts a fresh log), or
  // appends to it with `append` (a resumed run continues its log).
  explicit MetricsLogger(const std::string& path, bool append = false);

  std::string format(const StepMetrics& m) const;  // one console line
  void log_step(const StepMetrics& m);
  // `by_source`: each data source's val_loss (a mixture; val_loss is their weighted mean).
  void log_eval(int64_t step, double val_loss, int64_t val_tokens,
                const std::vector<std::pair<std::string, double>>& by_source = {});

 private:
  std::ofstream file_;
};

// Resident and peak resident memory of this process, in MiB.
double resident_memory_mb();
double peak_resident_memory_mb();

}  // namespace strata
