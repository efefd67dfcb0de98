// safetensors: header validation as the reference (Rust) reader does it, mmap reading, and
// the reference writer's layout (dtype alignment then name order, compact JSON, space padding).
#include "checkpoint/safetensors.h"

#include "checkpoint/file_io.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

namespace strata {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // the reference reader's limit

struct DtypeInfo {
  const char* name;
  int bits;
  int alignment_rank;  // the reference enum order: higher is written first
};

// Every dtype the reference reader knows, in its enum (alignment) order.
const std::vector<DtypeInfo>& dtype_table() {
  static const std::vector<DtypeInfo> table = {
      {"BOOL", 8, 0},        {"F4", 4, 1},          {"F6_E2M3", 6, 2},      {"F6_E3M2", 6, 3},
      {"U8", 8, 4},          {"I8", 8, 5},          {"F8_E5M2", 8, 6},      {"F8_E4M3", 8, 7},
      {"F8_E8M0", 8, 8},     {"F8_E4M3FNUZ", 8, 9}, {"F8_E5M2FNUZ", 8, 10}, {"I16", 16, 11},
      {"U16", 16, 12},       {"F16", 16, 13},       {"BF16", 16, 14},       {"I32", 32, 15},
      {"U32", 32, 16},       {"F32", 32, 17},       {"C64", 64, 18},        {"F64", 64, 19},
      {"I64", 64, 20},       {"U64", 64, 21}};
  return table;
}

const DtypeInfo* find_dtype(const std::string& name) {
  for (const DtypeInfo& d : dtype_table()) {
    if (name == d.name) return &d;
  }
  return nullptr;
}

[[noreturn]] void malformed(const std::string& file, const std::string& what) {
  throw CheckpointError(fmt::format("{} is not a valid safetensors file: {}\nHINT: the file is "
                                    "damaged or was not written completely; re-create or "
                                    "re-download it",
                                    file, what));
}

}  // namespace

std::string safetensors_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "F32";
    case at::kHalf: return "F16";
    case at::kBFloat16: return "BF16";
    case at::kDouble: return "F64";
    case at::kLong: return "I64";
    case at::kInt: return "I32";
    case at::kShort: return "I16";
    case at::kChar: return "I8";
    case at::kByte: return "U8";
    case at::kBool: return "BOOL";
    default:
      throw CheckpointError(fmt::format("dtype {} cannot be stored in safetensors by Strata",
                                        c10::toString(dtype)));
  }
}

at::ScalarType torch_dtype(const std::string& name) {
  static const std::map<std::string, at::ScalarType> map = {
      {"F32", at::kFloat}, {"F16", at::kHalf}, {"BF16", at::kBFloat16}, {"F64", at::kDouble},
      {"I64", at::kLong},  {"I32", at::kInt},  {"I16", at::kShort},     {"I8", at::kChar},
      {"U8", at::kByte},   {"BOOL", at::kBool}};
  auto it = map.find(name);
  if (it == map.end()) {
    throw CheckpointError(fmt::format("safetensors dtype {} has no LibTorch equivalent here",
                                      name));
  }
  return it->second;
}

SafetensorsHeader parse_safetensors_header(const uint8_t* data, size_t size,
                                           const std::string& file) {
  if (size < 8) malformed(file, fmt::format("{} bytes, shorter than the 8-byte header length", size));
  uint64_t n = 0;
  std::memcpy(&n, data, 8);  // little-endian on every platform Strata builds for
  if (n > kMaxHeaderBytes) {
    malformed(file, fmt::format("header length {} exceeds the limit of {} bytes", n, kMaxHeaderBytes));
  }
  if (8 + n > size) {
    malformed(file, fmt::format("header length {} runs past the end of the {}-byte file", n, size));
  }

  // Parse, rejecting duplicate top-level keys (the reference format disallows them).
  std::set<std::string> seen;
  std::string duplicate;
  const nlohmann::json::parser_callback_t detect_duplicates =
      [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
        if (depth == 1 && event == nlohmann::json::parse_event_t::key &&
            !seen.insert(parsed.get<std::string>()).second && duplicate.empty()) {
          duplicate = parsed.get<std::string>();
        }
        return true;
      };
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(data + 8, data + 8 + n, detect_duplicates);
  } catch (const nlohmann::json::exception& e) {
    malformed(file, fmt::format("header is not valid UTF-8 JSON ({})", e.what()));
  }
  if (!header.is_object()) malformed(file, "header is not a JSON object");
  if (!duplicate.empty()) malformed(file, fmt::format("tensor '{}' appears twice in the header", duplicate));

  SafetensorsHeader out;
  out.data_offset = 8 + n;
  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      if (!value.is_object()) malformed(file, "__metadata__ is not an object");
      for (const auto& [k, v] : value.items()) {
        if (!v.is_string()) {
          malformed(file, fmt::format("__metadata__ value of '{}' is not a string", k));
        }
        out.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    if (!value.is_object() || !value.contains("dtype") || !value.contains("shape") ||
        !value.contains("data_offsets")) {
      malformed(file, fmt::format("tensor '{}' lacks dtype, shape or data_offsets", key));
    }
    const nlohmann::json& dtype = value["dtype"];
    const nlohmann::json& shape = value["shape"];
    const nlohmann::json& offsets = value["data_offsets"];
    if (!dtype.is_string() || !find_dtype(dtype.get<std::string>())) {
      malformed(file, fmt::format("tensor '{}' has unknown dtype {}", key, dtype.dump()));
    }
    SafetensorsEntry entry{key, dtype.get<std::string>(), {}, 0, 0};
    if (!shape.is_array()) malformed(file, fmt::format("tensor '{}' shape is not a list", key));
    for (const nlohmann::json& d : shape) {
      if (!d.is_number_unsigned()) {
        malformed(file, fmt::format("tensor '{}' shape {} holds a non-integer or negative size",
                                    key, shape.dump()));
      }
      entry.shape.push_back(d.get<int64_t>());
    }
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
        !offsets[1].is_number_unsigned()) {
      malformed(file, fmt::format("tensor '{}' data_offsets {} is not [begin, end]", key, offsets.dump()));
    }
    entry.begin = offsets[0].get<uint64_t>();
    entry.end = offsets[1].get<uint64_t>();
    if (entry.end < entry.begin) {
      malformed(file, fmt::format("tensor '{}' ends (byte {}) before it begins (byte {})", key,
                                  entry.end, entry.begin));
    }
    out.entries.push_back(std::move(entry));
  }

  // Contiguous from 0, sizes matching shape x dtype, and nothing after the last tensor.
  std::sort(out.entries.begin(), out.entries.end(), [](const auto& a, const auto& b) {
    return std::tie(a.begin, a.end) < std::tie(b.begin, b.end);
  });
  uint64_t expected_begin = 0;
  for (const SafetensorsEntry& e : out.entries) {
    if (e.begin != expected_begin) {
      malformed(file, fmt::format("tensor '{}' starts at byte {} but the previous one ends at {} "
                                  "(gap or overlap)",
                                  e.name, e.begin, expected_begin));
    }
    unsigned __int128 bits = find_dtype(e.dtype)->bits;
    for (int64_t d : e.shape) {
      bits *= static_cast<uint64_t>(d);
      if (bits > static_cast<unsigned __int128>(UINT64_MAX)) {
        malformed(file, fmt::format("tensor '{}' shape overflows", e.name));
      }
    }
    if (bits % 8 != 0) malformed(file, fmt::format("tensor '{}' is not a whole number of bytes", e.name));
    if (static_cast<uint64_t>(bits / 8) != e.end - e.begin) {
      malformed(file, fmt::format("tensor '{}' of dtype {} and shape {} needs {} bytes, its "
                                  "data_offsets give {}",
                                  e.name, e.dtype, nlohmann::json(e.shape).dump(),
                                  static_cast<uint64_t>(bits / 8), e.end - e.begin));
    }
    expected_begin = e.end;
  }
  if (out.data_offset + expected_begin != size) {
    malformed(file, fmt::format("the tensors end at byte {} but the file has {} bytes ({})",
                                out.data_offset + expected_begin, size,
                                out.data_offset + expected_begin < size ? "trailing bytes"
                                                                        : "truncated"));
  }
  return out;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    throw CheckpointError(fmt::format("cannot open {}: {}", path, std::strerror(errno)));
  }
  struct stat st {};
  fstat(fd, &st);
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    void* map = mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
      ::close(fd);
      throw CheckpointError(fmt::format("cannot memory-map {}: {}", path, std::strerror(errno)));
    }
    map_ = static_cast<const uint8_t*>(map);
  }
  ::close(fd);
  try {
    header_ = parse_safetensors_header(map_, size_, path);
  } catch (...) {
    if (map_) munmap(const_cast<uint8_t*>(map_), size_);
    throw;
  }
  for (size_t i = 0; i < header_.entries.size(); ++i) index_[header_.entries[i].name] = i;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) munmap(const_cast<uint8_t*>(map_), size_);
}

bool SafetensorsFile::contains(const std::string& name) const { return index_.count(name) != 0; }

const SafetensorsEntry& SafetensorsFile::entry(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    throw CheckpointError(fmt::format("{} holds no tensor named '{}'", path_, name));
  }
  return header_.entries[it->second];
}

at::Tensor SafetensorsFile::tensor(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  const auto options = at::TensorOptions().dtype(torch_dtype(e.dtype));
  at::Tensor out = at::empty(e.shape, options);
  if (e.end > e.begin) std::memcpy(out.data_ptr(), map_ + header_.data_offset + e.begin, e.end - e.begin);
  return out;
}

at::Tensor SafetensorsFile::read_elements(const std::string& name, int64_t begin,
                                          int64_t count) const {
  at::Tensor out = at::empty({count}, at::TensorOptions().dtype(torch_dtype(entry(name).dtype)));
  copy_elements(name, begin, count, out.data_ptr());
  return out;
}

std::pair<uint64_t, uint64_t> SafetensorsFile::element_bytes(const std::string& name, int64_t begin,
                                                             int64_t count) const {
  const SafetensorsEntry& e = entry(name);
  const int64_t element = static_cast<int64_t>(c10::elementSize(torch_dtype(e.dtype)));
  const int64_t numel = static_cast<int64_t>((e.end - e.begin)) / element;
  if (begin < 0 || count < 0 || begin + count > numel) {
    throw CheckpointError(fmt::format("{}: elements [{}, {}) are outside tensor '{}' of {} elements",
                                      path_, begin, begin + count, name, numel));
  }
  const uint64_t first = header_.data_offset + e.begin + static_cast<uint64_t>(begin * element);
  return {first, first + static_cast<uint64_t>(count * element)};
}

void SafetensorsFile::prefetch(uint64_t first, uint64_t last) const {
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  first = first / page * page;
  last = std::min<uint64_t>(last, size_);
  if (map_ && last > first) {
    madvise(const_cast<uint8_t*>(map_) + first, last - first, MADV_WILLNEED);
  }
}

void SafetensorsFile::copy_elements(const std::string& name, int64_t begin, int64_t count,
                                    void* dest) const {
  const auto [first, last] = element_bytes(name, begin, count);
  if (last > first) std::memcpy(dest, map_ + first, last - first);
}

FileDigest write_safetensors_file(const std::string& path, std::vector<SafetensorsItem> items,
                                  std::map<std::string, std::string> metadata, bool hash_thread) {
  metadata.emplace("format", "pt");
  std::set<std::string> names;
  for (const SafetensorsItem& item : items) {
    if (!names.insert(item.name).second) {
      throw CheckpointError(fmt::format("cannot write {}: tensor '{}' given twice", path, item.name));
    }
  }
  // The reference writer's order: larger alignment first, then by name.
  auto rank_of = [](const SafetensorsItem& item) {
    return find_dtype(safetensors_dtype(item.dtype))->alignment_rank;
  };
  std::sort(items.begin(), items.end(), [&](const SafetensorsItem& a, const SafetensorsItem& b) {
    if (rank_of(a) != rank_of(b)) return rank_of(a) > rank_of(b);
    return a.name < b.name;
  });
  auto nbytes = [](const SafetensorsItem& item) {
    uint64_t n = c10::elementSize(item.dtype);
    for (int64_t d : item.shape) n *= static_cast<uint64_t>(d);
    return n;
  };
  nlohmann::ordered_json header;
  header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const SafetensorsItem& item : items) {
    const uint64_t bytes = nbytes(item);
    header[item.name] = {{"dtype", safetensors_dtype(item.dtype)},
                         {"shape", item.shape},
                         {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  const uint64_t n = text.size();
  try {
    HashingFileWriter out(path, hash_thread);
    out.write(&n, 8);
    out.write(text.data(), n);
    for (const SafetensorsItem& item : items) {
      if (nbytes(item) > 0) out.write(item.data, nbytes(item));
    }
    return out.finish();
  } catch (const IoError& e) {
    throw CheckpointError(fmt::format("{}\nHINT: check free disk space and permissions", e.what()));
  }
}

void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                       std::map<std::string, std::string> metadata) {
  std::vector<at::Tensor> keep;  // contiguous CPU copies while writing
  std::vector<SafetensorsItem> items;
  for (const auto& [name, tensor] : tensors) {
    keep.push_back(tensor.detach().to(at::kCPU).contiguous());
    items.push_back({name, keep.back().scalar_type(), keep.back().sizes().vec(), keep.back().data_ptr()});
  }
  const std::string temp = path + ".tmp";
  write_safetensors_file(temp, std::move(items), std::move(metadata));
  try {
    rename_durable(temp, path);
  } catch (const IoError& e) {
    std::remove(temp.c_str());
    throw CheckpointError(e.what());
  }
}

}  // namespace strata
