// StateDict: an ordered map from fully qualified name (fqn) to tensor. Insertion order is
// the model's parameter order; lookups by name are O(log n). Holds tensor handles, so a
// StateDict of a model's parameters aliases them (no copies).
#pragma once

#include <ATen/Tensor.h>

#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace strata {

class StateDict {
 public:
  void insert(const std::string& fqn, at::Tensor tensor) {
    if (!index_.emplace(fqn, entries_.size()).second) {
      throw std::invalid_argument("StateDict: duplicate key " + fqn);
    }
    entries_.emplace_back(fqn, std::move(tensor));
  }
  bool contains(const std::string& fqn) const { return index_.count(fqn) != 0; }
  const at::Tensor& at(const std::string& fqn) const {
    auto it = index_.find(fqn);
    if (it == index_.end()) throw std::out_of_range("StateDict: no key " + fqn);
    return entries_[it->second].second;
  }
  size_t size() const { return entries_.size(); }
  bool empty() const { return entries_.empty(); }
  auto begin() const { return entries_.begin(); }
  auto end() const { return entries_.end(); }
  std::vector<std::string> keys() const {
    std::vector<std::string> out;
    out.reserve(entries_.size());
    for (const auto& entry : entries_) out.push_back(entry.first);
    return out;
  }

 private:
  std::vector<std::pair<std::string, at::Tensor>> entries_;
  std::map<std::string, size_t> index_;
};

}  // namespace strata
