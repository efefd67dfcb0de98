// The launcher line of the start-up report (parallel/launcher.h), from given environments.
#include "parallel/launcher.h"

#include <gtest/gtest.h>

#include <map>
#include <string>

namespace strata {
namespace {

std::string describe(const std::map<std::string, std::string>& vars) {
  return launcher_description([&](const char* name) -> const char* {
    const auto it = vars.find(name);
    return it == vars.end() ? nullptr : it->second.c_str();
  });
}

// What srun --mpi=pmix gives each task (values as Slurm 22.05 sets them).
std::map<std::string, std::string> srun_step() {
  return {{"SLURM_JOB_ID", "12"},
          {"SLURM_STEP_ID", "0"},
          {"SLURM_STEP_NUM_TASKS", "4"},
          {"SLURM_NTASKS", "4"},
          {"SLURM_STEP_NUM_NODES", "2"},
          {"SLURM_JOB_NUM_NODES", "2"},
          {"SLURM_STEP_NODELIST", "n[1-2]"},
          {"SLURM_JOB_NODELIST", "n[1-2]"},
          {"SLURM_MPI_TYPE", "pmix"},
          {"PMIX_RANK", "0"},
          {"SLURM_JOB_PARTITION", "gpu"},
          {"SLURM_JOB_USER", "alice"}};
}

TEST(LauncherDescription, Singleton) {
  EXPECT_EQ(describe({}), "singleton");
  EXPECT_EQ(describe({{"HOME", "/root"}}), "singleton");
}

TEST(LauncherDescription, SrunStep) {
  EXPECT_EQ(describe(srun_step()),
            "slurm job 12 step 0 (srun, pmix), 4 task(s) on 2 node(s): n[1-2]");
}

TEST(LauncherDescription, SrunStepOfRequeuedJob) {
  auto vars = srun_step();
  vars["SLURM_RESTART_COUNT"] = "0";
  EXPECT_EQ(describe(vars), "slurm job 12 step 0 (srun, pmix), 4 task(s) on 2 node(s): n[1-2]");
  vars["SLURM_RESTART_COUNT"] = "2";
  EXPECT_EQ(describe(vars),
            "slurm job 12 (restart 2) step 0 (srun, pmix), 4 task(s) on 2 node(s): n[1-2]");
}

TEST(LauncherDescription, StepFallsBackToJobValues) {
  // A step with fewer tasks than the job reports its own; without step values, the job's.
  EXPECT_EQ(describe({{"SLURM_JOB_ID", "5"},
                      {"SLURM_STEP_ID", "3"},
                      {"SLURM_NTASKS", "2"},
                      {"SLURM_JOB_NUM_NODES", "1"},
                      {"SLURM_JOB_NODELIST", "vm"},
                      {"PMIX_RANK", "1"}}),
            "slurm job 5 step 3 (srun, pmix), 2 task(s) on 1 node(s): vm");
  EXPECT_EQ(describe({{"SLURM_JOB_ID", "5"},
                      {"SLURM_STEP_ID", "3"},
                      {"SLURM_STEP_NUM_TASKS", "1"},
                      {"SLURM_STEP_NUM_NODES", "1"},
                      {"SLURM_STEP_NODELIST", "vm"}}),
            "slurm job 5 step 3 (srun, no MPI plugin), 1 task(s) on 1 node(s): vm");
}

TEST(LauncherDescription, Mpirun) {
  EXPECT_EQ(describe({{"OMPI_COMM_WORLD_SIZE", "3"}, {"PMIX_RANK", "0"}}), "mpirun, 3 process(es)");
  // mpirun inside an allocation: its daemons may be a Slurm step; the ranks are mpirun's.
  EXPECT_EQ(describe({{"OMPI_COMM_WORLD_SIZE", "4"},
                      {"SLURM_JOB_ID", "7"},
                      {"SLURM_STEP_ID", "1"},
                      {"SLURM_MPI_TYPE", "none"}}),
            "mpirun, 4 process(es), in slurm job 7");
}

TEST(LauncherDescription, SingletonInsideAnAllocation) {
  EXPECT_EQ(describe({{"SLURM_JOB_ID", "9"}, {"SLURM_NTASKS", "2"}}),
            "singleton in slurm job 9 (no srun step)");
}

}  // namespace
}  // namespace strata
