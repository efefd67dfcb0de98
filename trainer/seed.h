// Counter-based randomness: stable 64-bit mixing for seeds that must not depend on the world
// size, the order of calls, or the platform.
#pragma once

#include <cstdint>
#include <string>

namespace strata {

// splitmix64's finaliser: a bijective 64-bit mix.
inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// A seed for (seed, name): FNV-1a of the name mixed with splitmix64.
inline uint64_t derive_seed(uint64_t seed, const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : name) h = (h ^ c) * 0x100000001b3ull;
  return splitmix64(splitmix64(seed) ^ h);
}

}  // namespace strata
