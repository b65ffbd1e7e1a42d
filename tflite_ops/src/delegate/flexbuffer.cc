// Flexbuffer map reader. Format facts used (flexbuffers spec):
// - The last byte is the root's byte width, the one before it the root's packed type
//   (type << 2 | log2(width of what it points to)); the root value sits just before them.
// - Offset values (maps, vectors, strings, keys, indirect scalars) point backwards: target =
//   position of the offset field - offset.
// - A map at position m with element width w: keys-vector offset at m - 3w, keys-vector element
//   width at m - 2w, element count at m - w, values at m + i*w, one packed type byte per value
//   after the values. Keys are sorted, null-terminated strings reached through the keys vector
//   (count at k - kw, offsets at k + i*kw).
// - Inline scalars in a map have the map's element width; strings store their length just before
//   the bytes, with the width from the packed type.
#include "flexbuffer.h"

#include <cstring>

namespace tfqat {
namespace flex {
namespace {

enum : unsigned {
  kTypeNull = 0,
  kTypeInt = 1,
  kTypeUInt = 2,
  kTypeFloat = 3,
  kTypeKey = 4,
  kTypeString = 5,
  kTypeIndirectInt = 6,
  kTypeIndirectUInt = 7,
  kTypeIndirectFloat = 8,
  kTypeMap = 9,
  kTypeBool = 26,
};

bool valid_width(uint64_t w) { return w == 1 || w == 2 || w == 4 || w == 8; }

class Reader {
 public:
  Reader(const uint8_t* data, size_t size, std::string* error)
      : data_(data), size_(size), error_(error) {}

  bool fail(const std::string& what) {
    *error_ = "malformed flexbuffer custom options (" + what + ")";
    return false;
  }

  bool in_bounds(size_t pos, size_t len) const { return pos <= size_ && len <= size_ - pos; }

  bool read_uint(size_t pos, size_t width, uint64_t* v) {
    if (!valid_width(width) || !in_bounds(pos, width)) return fail("read out of bounds");
    uint64_t r = 0;
    for (size_t i = 0; i < width; ++i) r |= static_cast<uint64_t>(data_[pos + i]) << (8 * i);
    *v = r;
    return true;
  }

  bool read_int(size_t pos, size_t width, int64_t* v) {
    uint64_t u = 0;
    if (!read_uint(pos, width, &u)) return false;
    if (width < 8) {
      const uint64_t sign = uint64_t{1} << (8 * width - 1);
      u = (u ^ sign) - sign;  // sign-extend without implementation-defined shifts
    }
    *v = static_cast<int64_t>(u);
    return true;
  }

  bool read_float(size_t pos, size_t width, double* v) {
    uint64_t u = 0;
    if (width != 4 && width != 8) return fail("float of width " + std::to_string(width));
    if (!read_uint(pos, width, &u)) return false;
    if (width == 4) {
      const uint32_t u32 = static_cast<uint32_t>(u);
      float f;
      std::memcpy(&f, &u32, 4);
      *v = f;
    } else {
      std::memcpy(v, &u, 8);
    }
    return true;
  }

  bool deref(size_t pos, size_t width, size_t* target) {
    uint64_t off = 0;
    if (!read_uint(pos, width, &off)) return false;
    if (off > pos) return fail("offset points before the buffer");
    *target = pos - static_cast<size_t>(off);
    return true;
  }

  bool read_key(size_t pos, std::string* key) {
    if (pos >= size_) return fail("key out of bounds");
    const void* end = std::memchr(data_ + pos, 0, size_ - pos);
    if (!end) return fail("unterminated key");
    key->assign(reinterpret_cast<const char*>(data_ + pos),
                static_cast<const uint8_t*>(end) - (data_ + pos));
    return true;
  }

  bool read_value(size_t pos, size_t parent_width, uint8_t packed, Value* v) {
    const unsigned type = packed >> 2;
    const size_t width = size_t{1} << (packed & 3);
    v->raw_type = static_cast<uint8_t>(type);
    size_t target = 0;
    switch (type) {
      case kTypeInt:
        v->kind = Value::Kind::kInt;
        return read_int(pos, parent_width, &v->i);
      case kTypeUInt:
        v->kind = Value::Kind::kUInt;
        return read_uint(pos, parent_width, &v->u);
      case kTypeFloat:
        v->kind = Value::Kind::kFloat;
        return read_float(pos, parent_width, &v->f);
      case kTypeBool: {
        uint64_t u = 0;
        if (!read_uint(pos, parent_width, &u)) return false;
        v->kind = Value::Kind::kBool;
        v->b = u != 0;
        return true;
      }
      case kTypeIndirectInt:
        v->kind = Value::Kind::kInt;
        return deref(pos, parent_width, &target) && read_int(target, width, &v->i);
      case kTypeIndirectUInt:
        v->kind = Value::Kind::kUInt;
        return deref(pos, parent_width, &target) && read_uint(target, width, &v->u);
      case kTypeIndirectFloat:
        v->kind = Value::Kind::kFloat;
        return deref(pos, parent_width, &target) && read_float(target, width, &v->f);
      case kTypeString: {
        uint64_t len = 0;
        if (!deref(pos, parent_width, &target)) return false;
        if (target < width) return fail("string length out of bounds");
        if (!read_uint(target - width, width, &len)) return false;
        if (!in_bounds(target, len)) return fail("string out of bounds");
        v->kind = Value::Kind::kString;
        v->s.assign(reinterpret_cast<const char*>(data_ + target), static_cast<size_t>(len));
        return true;
      }
      default:
        v->kind = Value::Kind::kOther;
        return true;
    }
  }

  bool parse(Map* out) {
    if (size_ < 3) return fail("shorter than 3 bytes");
    const size_t root_width = data_[size_ - 1];
    const uint8_t root_packed = data_[size_ - 2];
    if (!valid_width(root_width) || size_ < 2 + root_width) return fail("bad root width");
    if ((root_packed >> 2) != kTypeMap) return fail("root is not a map");
    const size_t w = size_t{1} << (root_packed & 3);
    size_t m = 0;
    if (!deref(size_ - 2 - root_width, root_width, &m)) return false;
    if (m < 3 * w) return fail("map header out of bounds");
    uint64_t n = 0, keys_width = 0;
    size_t keys = 0;
    if (!read_uint(m - w, w, &n) || !read_uint(m - 2 * w, w, &keys_width) ||
        !deref(m - 3 * w, w, &keys)) {
      return false;
    }
    if (!valid_width(keys_width)) return fail("bad key vector width");
    if (n > size_ || !in_bounds(m, static_cast<size_t>(n) * (w + 1))) {
      return fail("map values out of bounds");
    }
    uint64_t n_keys = 0;
    if (keys < keys_width || !read_uint(keys - keys_width, keys_width, &n_keys)) {
      return fail("key vector out of bounds");
    }
    if (n_keys != n) return fail("key and value counts differ");
    if (!in_bounds(keys, static_cast<size_t>(n) * keys_width)) return fail("keys out of bounds");
    const size_t types = m + static_cast<size_t>(n) * w;
    for (size_t i = 0; i < n; ++i) {
      size_t key_pos = 0;
      std::string key;
      Value value;
      if (!deref(keys + i * keys_width, keys_width, &key_pos) || !read_key(key_pos, &key) ||
          !read_value(m + i * w, w, data_[types + i], &value)) {
        return false;
      }
      (*out)[key] = std::move(value);
    }
    return true;
  }

 private:
  const uint8_t* data_;
  size_t size_;
  std::string* error_;
};

}  // namespace

const char* Value::kind_name() const {
  switch (kind) {
    case Kind::kInt: return "int";
    case Kind::kUInt: return "uint";
    case Kind::kFloat: return "float";
    case Kind::kBool: return "bool";
    case Kind::kString: return "string";
    case Kind::kOther: break;
  }
  return "unsupported flexbuffer type";
}

bool parse_map(const uint8_t* data, size_t size, Map* out, std::string* error) {
  out->clear();
  if (size == 0) return true;  // an op whose attrs all have defaults may carry no options
  if (!data) {
    *error = "malformed flexbuffer custom options (null data)";
    return false;
  }
  Reader r(data, size, error);
  return r.parse(out);
}

}  // namespace flex
}  // namespace tfqat
