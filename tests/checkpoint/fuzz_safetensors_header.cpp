// libFuzzer target: any byte string given to the safetensors header parser either parses or
// raises CheckpointError; anything else (a crash, a sanitizer report, another exception) is a bug.
#include <cstddef>
#include <cstdint>

#include "checkpoint/safetensors_header.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const strata::SafetensorsHeader header =
        strata::parse_safetensors_header(data, size, "fuzz.safetensors");
    // A parsed header's ranges lie inside the image.
    for (const strata::SafetensorsEntry& e : header.entries) {
      if (header.data_offset + e.end > size || e.begin > e.end) __builtin_trap();
    }
  } catch (const strata::CheckpointError&) {
  }
  return 0;
}
