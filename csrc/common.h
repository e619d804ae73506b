// Shared helpers of the sophiavl_mcore._C kernels: argument checks on numpy buffers,
// extraction of Python str sequences into one UTF-8 buffer, and OpenMP glue.
//
// No torch headers here: numpy buffers in, numpy out.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#ifdef SOPHIAVL_HAVE_OPENMP
#include <omp.h>
#endif

namespace sophiavl {

namespace py = pybind11;

// Returns "float64", "int32", ... for a numpy array (for error messages).
inline std::string dtype_name(const py::array& a) {
  return py::str(a.dtype()).cast<std::string>();
}

// Checks that `a` is a 1-D, C-contiguous numpy array of dtype T and returns its length.
// Throws std::invalid_argument (-> ValueError) naming `name` otherwise.
template <typename T>
inline py::ssize_t check_1d(const py::array& a, const char* name, const char* dtype_label) {
  if (a.ndim() != 1) {
    throw std::invalid_argument(std::string(name) + " must be a 1-D array, got " +
                                std::to_string(a.ndim()) + " dimensions");
  }
  if (!a.dtype().is(py::dtype::of<T>())) {
    throw std::invalid_argument(std::string(name) + " must have dtype " + dtype_label +
                                ", got " + dtype_name(a));
  }
  if (!(a.flags() & py::array::c_style)) {
    throw std::invalid_argument(std::string(name) + " must be C-contiguous");
  }
  return a.shape(0);
}

// Formats a double the way Python's repr would for the common cases (nan, inf, numbers).
std::string format_double(double v);

// UTF-8 views of all strings of one Python list/tuple. Python caches the UTF-8 form of a
// str inside the object, so no text is copied; `keep` holds a reference to every str (or
// to the bytes made for it) so the views stay valid without the GIL.
// Lone surrogates (possible in Python str) are encoded with "surrogatepass" so that any
// Python str is accepted; they are never whitespace nor alphanumeric.
struct TextBatch {
  std::vector<py::object> keep;
  std::vector<std::string_view> views;

  std::size_t size() const { return views.size(); }
  std::string_view get(std::size_t i) const { return views[i]; }
};

// Reads a list/tuple of str into a TextBatch. Needs the GIL. Throws std::invalid_argument
// naming `name` and the index of a non-str entry.
TextBatch extract_texts(const py::handle& seq, const char* name);

// Checks that two text batches have equal length.
void check_same_length(const TextBatch& a, const char* name_a, const TextBatch& b,
                       const char* name_b);

// Runs body(i) for i in [0, n) across OpenMP threads (dynamic schedule, chunk `chunk`);
// the first exception thrown by any iteration is rethrown after the loop.
template <typename Body>
void parallel_for_dynamic(std::int64_t n, std::int64_t chunk, Body&& body) {
  std::exception_ptr error = nullptr;
  std::mutex error_mutex;
#ifdef SOPHIAVL_HAVE_OPENMP
#pragma omp parallel for schedule(dynamic, chunk) if (n > 1)
#endif
  for (std::int64_t i = 0; i < n; ++i) {
    try {
      body(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  }
  (void)chunk;
  if (error) std::rethrow_exception(error);
}

// Per-thread state for parallel text loops: make one State per OpenMP thread and call
// body(state, i). Exceptions are collected as in parallel_for_dynamic.
template <typename State, typename Body>
void parallel_for_with_state(std::int64_t n, std::int64_t chunk, Body&& body) {
  std::exception_ptr error = nullptr;
  std::mutex error_mutex;
#ifdef SOPHIAVL_HAVE_OPENMP
#pragma omp parallel if (n > 1)
#endif
  {
    State state;
#ifdef SOPHIAVL_HAVE_OPENMP
#pragma omp for schedule(dynamic, chunk)
#endif
    for (std::int64_t i = 0; i < n; ++i) {
      try {
        body(state, i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
    }
  }
  (void)chunk;
  if (error) std::rethrow_exception(error);
}

// Registration functions, one per source file (called from module.cpp).
void register_trust_grpo(py::module_& m);
void register_porter(py::module_& m);
void register_rouge(py::module_& m);
void register_wer(py::module_& m);

}  // namespace sophiavl
