// Launcher detection from environment variables (see launcher.h).
#include "parallel/launcher.h"

#include <cstdlib>
#include <string>

#include <fmt/format.h>

namespace strata {
namespace {

// The variable's value, or "" when unset.
std::string value(const EnvLookup& env, const char* name) {
  const char* v = env(name);
  return v ? std::string(v) : std::string();
}

// The first set one of two variables (a step's own value, else the job's).
std::string first_of(const EnvLookup& env, const char* name, const char* fallback) {
  std::string v = value(env, name);
  return v.empty() ? value(env, fallback) : v;
}

// "slurm job J", with " (restart N)" once Slurm has requeued the job.
std::string slurm_job(const EnvLookup& env) {
  std::string job = "slurm job " + value(env, "SLURM_JOB_ID");
  const std::string restarts = value(env, "SLURM_RESTART_COUNT");
  if (!restarts.empty() && restarts != "0") job += " (restart " + restarts + ")";
  return job;
}

}  // namespace

std::string launcher_description(const EnvLookup& env) {
  const bool in_slurm_job = !value(env, "SLURM_JOB_ID").empty();
  // mpirun (Open MPI's launcher) exports OMPI_COMM_WORLD_SIZE to every process it starts, also
  // inside a Slurm allocation (where its daemons may run as a Slurm step themselves).
  const std::string mpirun_size = value(env, "OMPI_COMM_WORLD_SIZE");
  if (!mpirun_size.empty()) {
    return fmt::format("mpirun, {} process(es){}", mpirun_size,
                       in_slurm_job ? ", in " + slurm_job(env) : "");
  }
  if (in_slurm_job && !value(env, "SLURM_STEP_ID").empty()) {
    std::string mpi = value(env, "SLURM_MPI_TYPE");
    if (mpi.empty()) mpi = value(env, "PMIX_RANK").empty() ? "no MPI plugin" : "pmix";
    return fmt::format("{} step {} (srun, {}), {} task(s) on {} node(s): {}", slurm_job(env),
                       value(env, "SLURM_STEP_ID"), mpi,
                       first_of(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"),
                       first_of(env, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES"),
                       first_of(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"));
  }
  if (in_slurm_job) return fmt::format("singleton in {} (no srun step)", slurm_job(env));
  return "singleton";
}

std::string launcher_description() {
  return launcher_description([](const char* name) { return std::getenv(name); });
}

}  // namespace strata
