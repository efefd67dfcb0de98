// Metrics formatting and the JSONL log.
#include "trainer/metrics.h"

#include <fmt/format.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <nlohmann/json.hpp>
#include <stdexcept>

namespace strata {

MetricsLogger::MetricsLogger(const std::string& path, bool append) {
  if (path.empty()) return;
  file_.open(path, std::ios::out | (append ? std::ios::app : std::ios::trunc));
  if (!file_) {
    throw std::runtime_error(
        fmt::format("cannot open metrics file {} for writing\n"
                    "HINT: check that job.run_dir is writable",
                    path));
  }
}

std::string MetricsLogger::format(const StepMetrics& m) const {
  std::string mfu = m.mfu ? fmt::format(" | mfu {:.1f}%", *m.mfu * 100.0) : "";
  std::string comm = m.comm_fraction ? fmt::format(" | comm {:.0f}% {:.1f} MB",
                                                   *m.comm_fraction * 100.0, *m.comm_mb)
                                     : "";
  if (m.comm_exposed_fraction && m.comm_fraction && *m.comm_exposed_fraction != *m.comm_fraction) {
    comm += fmt::format(" ({:.0f}% exposed)", *m.comm_exposed_fraction * 100.0);
  }
  const std::string reserved =
      m.mem_reserved_mb ? fmt::format(" ({:.0f} reserved)", *m.mem_reserved_mb) : "";
  if (m.comm_fraction && m.comm_mb_replica && *m.comm_mb_replica > 0) {
    comm += fmt::format(" (shard {:.1f}, replica {:.1f})", *m.comm_mb_shard, *m.comm_mb_replica);
  }
  // A mixture: each source's share of the tokens, e.g. " | mix web 52% code 48%".
  std::string mix;
  int64_t total = 0;
  for (const auto& [name, tokens] : m.tokens_by_source) total += tokens;
  for (const auto& [name, tokens] : m.tokens_by_source) {
    mix += fmt::format("{} {} {:.0f}%", mix.empty() ? " | mix" : "", name,
                       total > 0 ? 100.0 * static_cast<double>(tokens) / total : 0.0);
  }
  const int64_t eta = static_cast<int64_t>(m.eta_s);
  return fmt::format(
      "step {:>{}}/{} | loss {:.4f} | grad_norm {:.3f} | lr {:.2e} | {:.0f} tok/s | "
      "{:.2f} TFLOP/s{} | {:.0f} ms/step{} | mem {:.0f} MiB{} | eta {}:{:02d}{}",
      m.step, fmt::formatted_size("{}", m.total_steps), m.total_steps, m.loss, m.grad_norm, m.lr,
      m.tokens_per_s, m.tflops, mfu, m.step_ms, comm, m.mem_mb, reserved, eta / 60, eta % 60, mix);
}

void MetricsLogger::log_step(const StepMetrics& m) {
  if (!file_.is_open()) return;
  nlohmann::json row = {{"step", m.step},
                        {"loss", m.loss},
                        {"grad_norm", m.grad_norm},
                        {"lr", m.lr},
                        {"tokens_per_s", m.tokens_per_s},
                        {"tflops", m.tflops},
                        {"mfu", m.mfu ? nlohmann::json(*m.mfu) : nlohmann::json()},
                        {"step_ms", m.step_ms},
                        {"mem_mb", m.mem_mb},
                        {"eta_s", m.eta_s}};
  if (m.mem_reserved_mb) row["mem_reserved_mb"] = *m.mem_reserved_mb;
  if (m.comm_fraction) {
    row["comm_fraction"] = *m.comm_fraction;
    row["comm_mb"] = *m.comm_mb;
  }
  if (m.comm_exposed_fraction) row["comm_exposed_fraction"] = *m.comm_exposed_fraction;
  if (m.comm_mb_shard) row["comm_mb_shard"] = *m.comm_mb_shard;
  if (m.comm_mb_replica) row["comm_mb_replica"] = *m.comm_mb_replica;
  if (!m.tokens_by_source.empty()) {
    nlohmann::json by_source = nlohmann::json::object();
    for (const auto& [name, tokens] : m.tokens_by_source) by_source[name] = tokens;
    row["tokens_by_source"] = by_source;
  }
  file_ << row.dump() << '\n';
  file_.flush();
}

void MetricsLogger::log_eval(int64_t step, double val_loss, int64_t val_tokens,
                             const std::vector<std::pair<std::string, double>>& by_source) {
  if (!file_.is_open()) return;
  nlohmann::json row = {{"step", step}, {"val_loss", val_loss}, {"val_tokens", val_tokens}};
  if (!by_source.empty()) {
    nlohmann::json losses = nlohmann::json::object();
    for (const auto& [name, loss] : by_source) losses[name] = loss;
    row["val_loss_by_source"] = losses;
  }
  file_ << row.dump() << '\n';
  file_.flush();
}

double resident_memory_mb() {
  long pages_total = 0, pages_resident = 0;
  if (FILE* f = std::fopen("/proc/self/statm", "r")) {
    if (std::fscanf(f, "%ld %ld", &pages_total, &pages_resident) != 2) pages_resident = 0;
    std::fclose(f);
  }
  return static_cast<double>(pages_resident) * static_cast<double>(sysconf(_SC_PAGESIZE)) /
         (1024.0 * 1024.0);
}

double peak_resident_memory_mb() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / 1024.0;  // ru_maxrss is in KiB on Linux
}

}  // namespace strata
