// The checkpoint layer's errors, one header for all of them (no LibTorch: the fuzz target of
// the safetensors header parser builds with this alone).
#pragma once

#include <stdexcept>
#include <string>
#include <utility>

namespace strata {

// A checkpoint or model file is missing, malformed, or does not fit the model.
class CheckpointError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An I/O failure: names the path, the operation and the system's reason.
class IoError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A failed Hub request. `status` is 0 for a transport failure (connection, timeout);
// `error_code` is the Hub's X-Error-Code; `transient` failures were retried before this was
// thrown.
class HubError : public CheckpointError {
 public:
  HubError(const std::string& message, long status, std::string error_code, bool transient)
      : CheckpointError(message),
        status(status),
        error_code(std::move(error_code)),
        transient(transient) {}
  long status;
  std::string error_code;
  bool transient;
};

}  // namespace strata
