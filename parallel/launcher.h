// How this process was launched, for the start-up report: a Slurm step (srun, with its job id,
// step id, task count and node list), mpirun, or a singleton. Read from the launchers' own
// environment variables; only the ones named in launcher.cpp are looked at or printed. The
// layout itself (ranks per node) comes from MPI: ProcessGroup::describe().
#pragma once

#include <functional>
#include <string>

namespace strata {

// Looks up an environment variable; nullptr when unset.
using EnvLookup = std::function<const char*(const char*)>;

// One line, e.g. "slurm job 12 step 0 (srun, pmix), 2 task(s) on 1 node(s): n1",
// "slurm job 12 (restart 1) step 0 (srun, pmix), 4 task(s) on 2 node(s): n[1-2]",
// "mpirun, 3 process(es)", "mpirun, 4 process(es), in slurm job 7", "singleton",
// "singleton in slurm job 12 (no srun step)".
std::string launcher_description(const EnvLookup& env);
std::string launcher_description();  // from this process's environment

}  // namespace strata
