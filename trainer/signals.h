// Stop signals: SIGTERM (schedulers' preemption notice) and SIGUSR1 (`srun --signal=USR1@120`,
// `sbatch --signal=B:USR1@120`) only set a flag; the training loop checks it at the next step
// boundary, where all ranks agree, save a full checkpoint and exit 0.
#pragma once

namespace strata {

// Installs the handlers (idempotent). A second SIGTERM/SIGUSR1 is ignored; SIGINT is left alone.
void install_stop_signal_handlers();
bool stop_requested();
// The signal that set the flag ("SIGTERM", "SIGUSR1"), or "" when none.
const char* stop_signal_name();

}  // namespace strata
