// Internals shared by config.cpp (parsing) and config_validation.cpp (value checks).
#pragma once

#include <map>
#include <string>

#include "trainer/config/config.h"

namespace strata::config_detail {

// Throws ConfigError "config error: <what> (<where>)" with an optional HINT line.
[[noreturn]] void fail(const std::string& what, const std::string& where,
                       const std::string& hint = "");

// Checks every value of `config`; `where` maps key paths to their source, `file` is the
// config's name (for keys left at their default).
void validate(const Config& config, const std::map<std::string, std::string>& where,
              const std::string& file, int world_size);

}  // namespace strata::config_detail
