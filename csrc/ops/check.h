// Argument checks with messages built by plain string concatenation.
//
// Why not TORCH_CHECK(cond, a, b, c): that formats through std::ostringstream instantiated inside this
// library, and on the GPU image (torch 2.11 built by another libstdc++ than /opt/gcc's g++) inserting
// an integer into that stream segfaulted in a locale facet. A single pre-built std::string takes
// c10's no-stream path.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <string_view>

namespace specmoe {

inline std::string to_text(const char* s) { return s; }
inline std::string to_text(const std::string& s) { return s; }
inline std::string to_text(std::string_view s) { return std::string(s); }
inline std::string to_text(bool v) { return v ? "true" : "false"; }
inline std::string to_text(int v) { return std::to_string(v); }
inline std::string to_text(long v) { return std::to_string(v); }
inline std::string to_text(long long v) { return std::to_string(v); }
inline std::string to_text(unsigned long v) { return std::to_string(v); }
inline std::string to_text(c10::ScalarType t) { return c10::toString(t); }
inline std::string to_text(const c10::Device& d) { return d.str(); }
inline std::string to_text(c10::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + "]";
}

template <typename... Args>
std::string concat(const Args&... args) {
  std::string s;
  ((s += to_text(args)), ...);
  return s;
}

}  // namespace specmoe

// SPECMOE_CHECK(cond, pieces...): raises c10::Error (RuntimeError in Python) with the pieces joined.
#define SPECMOE_CHECK(cond, ...) TORCH_CHECK((cond), ::specmoe::concat(__VA_ARGS__))

namespace specmoe {

// Raises unless `t` (argument `name` of `op`) lives on `ref`'s device.
inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                              const char* ref_name) {
  SPECMOE_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
                " is on ", ref.device());
}

}  // namespace specmoe
