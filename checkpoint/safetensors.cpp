// safetensors: mmap reading (headers: safetensors_header.cpp) and the reference writer's
// layout (dtype alignment then name order, compact JSON, space padding).
#include "checkpoint/safetensors.h"

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

#include "checkpoint/file_io.h"

namespace strata {
namespace {

const SafetensorsDtype* find_dtype(const std::string& name) {
  return find_safetensors_dtype(name);
}

}  // namespace

std::string safetensors_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return "F32";
    case at::kHalf:
      return "F16";
    case at::kBFloat16:
      return "BF16";
    case at::kDouble:
      return "F64";
    case at::kLong:
      return "I64";
    case at::kInt:
      return "I32";
    case at::kShort:
      return "I16";
    case at::kChar:
      return "I8";
    case at::kByte:
      return "U8";
    case at::kBool:
      return "BOOL";
    default:
      throw CheckpointError(
          fmt::format("dtype {} cannot be stored in safetensors by Strata", c10::toString(dtype)));
  }
}

at::ScalarType torch_dtype(const std::string& name) {
  static const std::map<std::string, at::ScalarType> map = {
      {"F32", at::kFloat}, {"F16", at::kHalf}, {"BF16", at::kBFloat16}, {"F64", at::kDouble},
      {"I64", at::kLong},  {"I32", at::kInt},  {"I16", at::kShort},     {"I8", at::kChar},
      {"U8", at::kByte},   {"BOOL", at::kBool}};
  auto it = map.find(name);
  if (it == map.end()) {
    throw CheckpointError(
        fmt::format("safetensors dtype {} has no LibTorch equivalent here", name));
  }
  return it->second;
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

bool SafetensorsFile::contains(const std::string& name) const {
  return index_.count(name) != 0;
}

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
  if (e.end > e.begin)
    std::memcpy(out.data_ptr(), map_ + header_.data_offset + e.begin, e.end - e.begin);
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
    throw CheckpointError(
        fmt::format("{}: elements [{}, {}) are outside tensor '{}' of {} elements", path_, begin,
                    begin + count, name, numel));
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
      throw CheckpointError(
          fmt::format("cannot write {}: tensor '{}' given twice", path, item.name));
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
    // Large files bypass the page cache (O_DIRECT): on the machines measured this writes at
    // the disk's speed instead of the page-cache copy's (BENCHMARKS.md).
    const bool direct = 8 + n + offset >= (uint64_t{16} << 20);
    HashingFileWriter out(path, hash_thread, direct);
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
    items.push_back(
        {name, keep.back().scalar_type(), keep.back().sizes().vec(), keep.back().data_ptr()});
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
