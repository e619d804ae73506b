// A small open-addressing hash map from byte strings to uint32 values, storing its keys
// in one arena (no per-key allocation). Not thread-safe: use one per thread.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace sophiavl {

class Interner {
 public:
  Interner() : slots_(1024, 0) {}

  std::size_t size() const { return entries_.size(); }

  // Returns the value stored for `key`; on a miss stores make_value() first.
  template <typename MakeValue>
  std::uint32_t find_or_insert(std::string_view key, MakeValue&& make_value) {
    const std::uint64_t h = hash(key);
    std::size_t mask = slots_.size() - 1;
    std::size_t pos = static_cast<std::size_t>(h) & mask;
    while (std::uint32_t slot = slots_[pos]) {
      const Entry& e = entries_[slot - 1];
      if (e.hash == h && e.len == key.size() &&
          std::string_view(arena_.data() + e.offset, e.len) == key) {
        return e.value;
      }
      pos = (pos + 1) & mask;
    }
    const std::uint32_t value = make_value();
    entries_.push_back(Entry{h, arena_.size(), static_cast<std::uint32_t>(key.size()), value});
    arena_.append(key.data(), key.size());
    slots_[pos] = static_cast<std::uint32_t>(entries_.size());
    if (entries_.size() * 2 > slots_.size()) grow();
    return value;
  }

  // Returns the dense id (0, 1, 2, ...) of `key`, assigning the next one on a miss.
  std::uint32_t intern(std::string_view key) {
    const std::uint32_t next = static_cast<std::uint32_t>(entries_.size());
    return find_or_insert(key, [next] { return next; });
  }

 private:
  struct Entry {
    std::uint64_t hash;
    std::size_t offset;
    std::uint32_t len;
    std::uint32_t value;
  };

  static std::uint64_t hash(std::string_view s) {  // FNV-1a with a final avalanche
    std::uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s) {
      h ^= c;
      h *= 1099511628211ull;
    }
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 32;
    return h;
  }

  void grow() {
    std::vector<std::uint32_t> slots(slots_.size() * 2, 0);
    const std::size_t mask = slots.size() - 1;
    for (std::size_t i = 0; i < entries_.size(); ++i) {
      std::size_t pos = static_cast<std::size_t>(entries_[i].hash) & mask;
      while (slots[pos]) pos = (pos + 1) & mask;
      slots[pos] = static_cast<std::uint32_t>(i + 1);
    }
    slots_.swap(slots);
  }

  std::vector<std::uint32_t> slots_;  // 0 = empty, else entry index + 1
  std::vector<Entry> entries_;
  std::string arena_;
};

}  // namespace sophiavl
