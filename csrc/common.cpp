// Implementation of the shared helpers declared in common.h.
#include "common.h"

#include <cmath>
#include <cstdio>

namespace sophiavl {

std::string format_double(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.17g", v);
  return buf;
}

TextBatch extract_texts(const py::handle& seq, const char* name) {
  if (!PyList_Check(seq.ptr()) && !PyTuple_Check(seq.ptr())) {
    throw std::invalid_argument(std::string(name) + " must be a list or tuple of str, got " +
                                std::string(py::str(py::type::of(seq).attr("__name__"))));
  }
  PyObject* fast = seq.ptr();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  PyObject** items = PySequence_Fast_ITEMS(fast);
  TextBatch out;
  out.keep.reserve(static_cast<std::size_t>(n));
  out.views.reserve(static_cast<std::size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = items[i];
    if (!PyUnicode_Check(item)) {
      throw std::invalid_argument(std::string(name) + "[" + std::to_string(i) + "] is " +
                                  Py_TYPE(item)->tp_name + "; expected str");
    }
    Py_ssize_t len = 0;
    const char* utf8 = PyUnicode_AsUTF8AndSize(item, &len);
    if (utf8 != nullptr) {
      out.keep.push_back(py::reinterpret_borrow<py::object>(item));
    } else {
      // Lone surrogates cannot be encoded strictly; surrogatepass keeps them as 3 bytes.
      PyErr_Clear();
      py::object bytes = py::reinterpret_steal<py::object>(
          PyUnicode_AsEncodedString(item, "utf-8", "surrogatepass"));
      if (!bytes) throw py::error_already_set();
      utf8 = PyBytes_AS_STRING(bytes.ptr());
      len = PyBytes_GET_SIZE(bytes.ptr());
      out.keep.push_back(std::move(bytes));
    }
    out.views.emplace_back(utf8, static_cast<std::size_t>(len));
  }
  return out;
}

void check_same_length(const TextBatch& a, const char* name_a, const TextBatch& b,
                       const char* name_b) {
  if (a.size() != b.size()) {
    throw std::invalid_argument(std::string(name_a) + " and " + name_b +
                                " must have the same length, got " + std::to_string(a.size()) +
                                " and " + std::to_string(b.size()));
  }
}

}  // namespace sophiavl
