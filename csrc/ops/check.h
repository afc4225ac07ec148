// Argument checks with messages built by plain string concatenation, and what the checks share across
// backends.
//
// Why not TORCH_CHECK(cond, a, b, c): that formats through std::ostringstream instantiated inside this
// library, and on the GPU image (torch 2.11 built by another libstdc++ than /opt/gcc's g++) inserting
// an integer into that stream segfaulted in a locale facet. A single pre-built std::string takes
// c10's no-stream path.
//
// One copy of every check serves every backend. The <family>_common.h checks are templates on the size
// type I: int64_t for the CPU and CUDA kernels, c10::SymInt for the Meta kernels (<family>_meta.cpp),
// which torch.compile / FakeTensor / opcheck run with symbolic sizes under dynamic shapes (a SymInt
// comparison records a guard and returns a bool, so the same expressions work for both).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <initializer_list>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace specmoe {

inline std::string to_text(const char* s) { return s; }
inline std::string to_text(const std::string& s) { return s; }
inline std::string to_text(std::string_view s) { return std::string(s); }
inline std::string to_text(bool v) { return v ? "true" : "false"; }
inline std::string to_text(int v) { return std::to_string(v); }
inline std::string to_text(long v) { return std::to_string(v); }
inline std::string to_text(long long v) { return std::to_string(v); }
inline std::string to_text(unsigned long v) { return std::to_string(v); }
inline std::string to_text(double v) { return std::to_string(v); }
inline std::string to_text(c10::ScalarType t) { return c10::toString(t); }
inline std::string to_text(const c10::Device& d) { return d.str(); }
inline std::string to_text(const c10::SymInt& v) {
  if (auto i = v.maybe_as_int()) return std::to_string(*i);
  return v.toSymNodeImplUnowned()->str();  // a symbolic size (dynamic shapes): its expression
}
template <typename V>
std::string to_text(c10::ArrayRef<V> a) {  // IntArrayRef and SymIntArrayRef: "[2, 3]"
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + to_text(a[i]);
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

// Size accessors of the checks: sizes_of<I>(t), size_of<I>(t, d), strides_of<I>(t), stride_of<I>(t, d).
template <typename I> auto sizes_of(const at::Tensor& t) { return at::symint::sizes<I>(t); }
template <typename I> I size_of(const at::Tensor& t, int64_t d) { return at::symint::size<I>(t, d); }
template <typename I> auto strides_of(const at::Tensor& t) { return at::symint::strides<I>(t); }
template <typename I> I stride_of(const at::Tensor& t, int64_t d) { return strides_of<I>(t)[d]; }
template <typename I> I numel_of(const at::Tensor& t) { return at::symint::numel<I>(t); }
template <typename I> I storage_offset_of(const at::Tensor& t) {
  if constexpr (std::is_same_v<I, c10::SymInt>) return t.sym_storage_offset();
  else return t.storage_offset();
}

// Outputs of the sizes the checks computed: at::empty for int64_t sizes, at::empty_symint for SymInts.
template <typename I>
at::Tensor empty_sized(std::initializer_list<I> sizes, const at::TensorOptions& o) {
  if constexpr (std::is_same_v<I, c10::SymInt>) return at::empty_symint(c10::SymIntArrayRef(sizes), o);
  else return at::empty(c10::IntArrayRef(sizes), o);
}

// The backend a Meta-kernel call stands for, for the checks that differ by backend (dtypes, head dims):
// FakeTensors (torch.compile, opcheck) keep their device's backend key next to Meta, so a fake CUDA tensor
// gets the CUDA rules; plain meta tensors carry no other backend and get the CPU rules.
inline bool meta_stands_for_cuda(const at::Tensor& t) {
  return t.key_set().has_backend(c10::BackendComponent::CUDABit);
}

// Raises unless `t` (argument `name` of `op`) lives on `ref`'s device.
inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                              const char* ref_name) {
  SPECMOE_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
                " is on ", ref.device());
}

// Raises when two of `tensors` share memory (e.g. the same tensor passed twice to an op that writes one
// of them); name_of(i) names tensors[i] in the message. Reads metadata only (storage identity and
// offsets): no device access, works for meta and fake tensors. Sorted by (storage, first byte), so N
// tensors cost N log N comparisons.
template <typename I, typename NameOf>
void check_disjoint(const char* op, const std::vector<const at::Tensor*>& tensors, NameOf&& name_of) {
  struct Span {
    const void* storage;
    I begin, end;  // bytes [begin, end) of the storage
    size_t index;
  };
  std::vector<Span> spans;
  spans.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = *tensors[i];
    const void* storage = t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl();
    if (storage == nullptr) continue;  // no storage: cannot alias through one
    const int64_t elem = int64_t(t.element_size());
    const I begin = storage_offset_of<I>(t) * elem, end = begin + numel_of<I>(t) * elem;
    if (begin < end) spans.push_back({storage, begin, end, i});  // empty tensors share no bytes
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.storage != b.storage ? std::less<const void*>()(a.storage, b.storage) : a.begin < b.begin;
  });
  for (size_t s = 1; s < spans.size(); ++s) {  // sorted by start: any overlap shows between neighbours
    const Span &a = spans[s - 1], &b = spans[s];
    SPECMOE_CHECK(a.storage != b.storage || !(b.begin < a.end), op, ": ", name_of(std::min(a.index, b.index)),
                  " and ", name_of(std::max(a.index, b.index)),
                  " share memory (the same tensor passed twice?); each must be its own tensor");
  }
}

}  // namespace specmoe
