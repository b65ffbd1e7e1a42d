// A minimal, bounds-checked reader for the one flexbuffer shape TFQAT_* ops carry as custom
// options: a map from attr name to a scalar (what the TF converter writes for the extra attrs of
// a `tfl_fusable_op` composite). Untrusted input: every read is checked against the buffer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>

namespace tfqat {
namespace flex {

struct Value {
  enum class Kind { kInt, kUInt, kFloat, kBool, kString, kOther };
  Kind kind = Kind::kOther;
  int64_t i = 0;
  uint64_t u = 0;
  double f = 0.0;
  bool b = false;
  std::string s;
  uint8_t raw_type = 0;  // the flexbuffer type code, for messages about kOther values

  const char* kind_name() const;
};

using Map = std::map<std::string, Value>;

// Parses `size` bytes whose root must be a map. Values that are not int, uint, float, bool or
// string (vectors, blobs, nested maps, null) are kept as Kind::kOther so that an attr we do not
// read cannot make a model unloadable. Returns false and sets *error on malformed input.
bool parse_map(const uint8_t* data, size_t size, Map* out, std::string* error);

}  // namespace flex
}  // namespace tfqat
