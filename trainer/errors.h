// The trainer layer's errors. Failures of loaded files come from the checkpoint layer
// (CheckpointError, IoError, HubError), of the distributed runtime from parallel/
// (DistributedError).
#pragma once

#include <stdexcept>

namespace strata {

// Any problem with the configuration or the command line: unknown key, wrong type, bad value,
// bad override, an option that does not fit the model.
class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A data file (token shard, tokenizer, text input) is missing, malformed, or inconsistent with
// the configuration.
class DataError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace strata
