// Fused CLIP normalisation + Qwen2-VL patch layout of uint8 RGB images (one, or a batch
// written back to back into one buffer). Python reference: normalize_patchify_into and
// patchify in sophiavl_mcore/data/images.py.
//
// image uint8 [H, W, 3] → out float32 [(H/p)·(W/p), 3·T·p·p] with
//   out[((bh·(W/(p·m)) + bw)·m + i)·m + j, ((c·T + t)·p + y)·p + x]
//       = (image[(bh·m + i)·p + y, (bw·m + j)·p + x, c] / 255 − mean[c]) / std[c]
// for every temporal copy t (a still image is repeated T times): transformers'
// Qwen2-VL order, grid (t, h/m, w/m, m, m) × patch (C, T, p, p).
//
// One pass over the pixels: each output row (one patch) is built in a small buffer from
// a per-channel 256-entry table (the float32 value of x·scale + bias for every byte, the
// same two roundings as the numpy/torch reference), then the buffer is stored T times.
// The output is written strictly in order; when it is 16-byte aligned the stores bypass
// the cache (non-temporal): the whole batch is far larger than any cache, and it saves
// the read-for-ownership of every output line (else memcpy). OpenMP, dynamic schedule,
// over the rows of merge windows of all images of a call.
#include "patchify.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <pybind11/stl.h>

#include "common.h"

namespace sophiavl {
namespace {

using Table = std::array<std::array<float, 256>, 3>;

Table make_table(const std::array<double, 3>& mean, const std::array<double, 3>& std_) {
  Table t{};
  for (int c = 0; c < 3; ++c) {
    if (!std::isfinite(mean[c]) || !std::isfinite(std_[c]) || !(std_[c] > 0.0)) {
      throw std::invalid_argument("mean[" + std::to_string(c) + "]=" + format_double(mean[c]) +
                                  ", std[" + std::to_string(c) + "]=" + format_double(std_[c]) +
                                  ": mean must be finite and std finite and > 0");
    }
    // float32 constants rounded from double, as the reference builds them.
    const float scale = static_cast<float>(1.0 / (255.0 * std_[c]));
    const float bias = static_cast<float>(-mean[c] / std_[c]);
    for (int v = 0; v < 256; ++v) {
      volatile float prod = static_cast<float>(v) * scale;  // no fused multiply-add
      t[c][v] = prod + bias;
    }
  }
  return t;
}

// Copies n floats (n % 4 == 0) from src to a 16-byte aligned dst without caching dst.
inline void store_stream(float* dst, const float* src, std::int64_t n) {
#if defined(__SSE2__)
  for (std::int64_t k = 0; k < n; k += 4) _mm_stream_ps(dst + k, _mm_loadu_ps(src + k));
#else
  std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(float));
#endif
}

struct Geometry {
  std::int64_t h, w, p, t, m, gh, gw, row_len, plane;
};

// Writes the output rows of merge-window row bh (m·m·gw/m patches) from the image.
void fill_window_row(const std::uint8_t* img, float* out, const Table& lut, const Geometry& g,
                     std::int64_t bh, bool stream, float* buf) {
  const std::int64_t p = g.p, m = g.m, plane = g.plane;
  for (std::int64_t bw = 0; bw < g.gw / m; ++bw) {
    for (std::int64_t i = 0; i < m; ++i) {
      for (std::int64_t j = 0; j < m; ++j) {
        const std::int64_t r = bh * m + i, c = bw * m + j;
        float* dst = out + (((bh * (g.gw / m) + bw) * m + i) * m + j) * g.row_len;
        for (std::int64_t y = 0; y < p; ++y) {
          const std::uint8_t* src = img + ((r * p + y) * g.w + c * p) * 3;
          float* b0 = buf + y * p;
          float* b1 = b0 + plane;
          float* b2 = b1 + plane;
          for (std::int64_t x = 0; x < p; ++x) {
            b0[x] = lut[0][src[3 * x]];
            b1[x] = lut[1][src[3 * x + 1]];
            b2[x] = lut[2][src[3 * x + 2]];
          }
        }
        // The T copies of each channel plane reuse the values just computed.
        for (int ch = 0; ch < 3; ++ch) {
          const float* plane_src = buf + ch * plane;
          for (std::int64_t tt = 0; tt < g.t; ++tt) {
            float* d = dst + (ch * g.t + tt) * plane;
            if (stream) {
              store_stream(d, plane_src, plane);
            } else {
              std::memcpy(d, plane_src, static_cast<std::size_t>(plane) * sizeof(float));
            }
          }
        }
      }
    }
  }
}

void check_positive(std::int64_t v, const char* name) {
  if (v < 1) throw std::invalid_argument(std::string(name) + " must be >= 1, got " + std::to_string(v));
}

std::string shape_str(const py::array& a) {
  std::string s = "[";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(a.shape(d));
  return s + "]";
}

// Checks one uint8 [H, W, 3] C-contiguous image (`name` labels it in errors) and returns
// its patch geometry.
Geometry check_image(const py::array& image, std::int64_t patch, std::int64_t temporal,
                     std::int64_t merge, const std::string& name) {
  if (image.ndim() != 3 || image.shape(2) != 3) {
    throw std::invalid_argument(name + " must have shape [H, W, 3], got " + shape_str(image));
  }
  if (!image.dtype().is(py::dtype::of<std::uint8_t>())) {
    throw std::invalid_argument(name + " must have dtype uint8, got " + dtype_name(image));
  }
  if (!(image.flags() & py::array::c_style)) throw std::invalid_argument(name + " must be C-contiguous");
  Geometry g{};
  g.h = image.shape(0);
  g.w = image.shape(1);
  g.p = patch;
  g.t = temporal;
  g.m = merge;
  const std::int64_t f = patch * merge;
  if (g.h % f || g.w % f) {
    throw std::invalid_argument(name + " " + std::to_string(g.h) + "x" + std::to_string(g.w) +
                                " is not a multiple of patch " + std::to_string(patch) + " × merge " +
                                std::to_string(merge) + " = " + std::to_string(f) +
                                " in height and width");
  }
  g.gh = g.h / patch;
  g.gw = g.w / patch;
  g.plane = patch * patch;
  g.row_len = 3 * temporal * g.plane;
  return g;
}

// `out` checked against [rows, row_len] float32 C-contiguous writeable, or allocated.
py::array_t<float> output_array(const std::optional<py::array>& out_arg, std::int64_t rows,
                                std::int64_t row_len, const std::string& what) {
  if (!out_arg.has_value()) return py::array_t<float>({rows, row_len});
  const py::array& o = *out_arg;
  if (!o.dtype().is(py::dtype::of<float>())) {
    throw std::invalid_argument("out must have dtype float32, got " + dtype_name(o));
  }
  if (o.ndim() != 2 || o.shape(0) != rows || o.shape(1) != row_len) {
    throw std::invalid_argument("out must have shape [" + std::to_string(rows) + ", " +
                                std::to_string(row_len) + "] for " + what + ", got " + shape_str(o));
  }
  if (!(o.flags() & py::array::c_style)) throw std::invalid_argument("out must be C-contiguous");
  if (!o.writeable()) throw std::invalid_argument("out must be writeable");
  return py::reinterpret_borrow<py::array_t<float>>(o);
}

struct Job {
  const std::uint8_t* img;
  float* out;
  Geometry g;
};

// All merge-window rows of all jobs as one dynamic OpenMP loop: one parallel region per
// call, and a thread that the OS pauses (loaded machine) holds up one row, not a share.
void run_jobs(const std::vector<Job>& jobs, const Table& lut) {
  std::vector<std::pair<std::int32_t, std::int64_t>> tasks;
  for (std::size_t k = 0; k < jobs.size(); ++k) {
    for (std::int64_t bh = 0; bh < jobs[k].g.gh / jobs[k].g.m; ++bh) {
      tasks.emplace_back(static_cast<std::int32_t>(k), bh);
    }
  }
  std::int64_t plane_max = 1;
  for (const Job& j : jobs) plane_max = std::max(plane_max, j.g.plane);
  const auto n = static_cast<std::int64_t>(tasks.size());
  py::gil_scoped_release release;
#ifdef SOPHIAVL_HAVE_OPENMP
#pragma omp parallel if (n > 1)
#endif
  {
    std::vector<float> buf(static_cast<std::size_t>(3 * plane_max));
#ifdef SOPHIAVL_HAVE_OPENMP
#pragma omp for schedule(dynamic, 1) nowait
#endif
    for (std::int64_t i = 0; i < n; ++i) {
      const Job& j = jobs[static_cast<std::size_t>(tasks[i].first)];
      const bool stream = reinterpret_cast<std::uintptr_t>(j.out) % 16 == 0 && j.g.plane % 4 == 0;
      fill_window_row(j.img, j.out, lut, j.g, tasks[i].second, stream, buf.data());
    }
#if defined(__SSE2__)
    _mm_sfence();  // this thread's non-temporal stores are visible before the join
#endif
  }
}

py::array_t<float> normalize_patchify(const py::array& image, const std::array<double, 3>& mean,
                                      const std::array<double, 3>& std_, std::int64_t patch,
                                      std::int64_t temporal, std::int64_t merge,
                                      std::optional<py::array> out_arg) {
  check_positive(patch, "patch");
  check_positive(temporal, "temporal");
  check_positive(merge, "merge");
  const Geometry g = check_image(image, patch, temporal, merge, "image");
  py::array_t<float> out = output_array(out_arg, g.gh * g.gw, g.row_len,
                                        "a " + std::to_string(g.h) + "x" + std::to_string(g.w) + " image");
  const Table lut = make_table(mean, std_);
  run_jobs({Job{static_cast<const std::uint8_t*>(image.data()), out.mutable_data(), g}}, lut);
  return out;
}

py::array_t<float> normalize_patchify_batch(const py::list& images,
                                            const std::array<double, 3>& mean,
                                            const std::array<double, 3>& std_, std::int64_t patch,
                                            std::int64_t temporal, std::int64_t merge,
                                            std::optional<py::array> out_arg) {
  check_positive(patch, "patch");
  check_positive(temporal, "temporal");
  check_positive(merge, "merge");
  std::vector<py::array> arrays;  // keeps the buffers alive while the GIL is released
  std::vector<Job> jobs;
  std::int64_t rows = 0;
  for (std::size_t k = 0; k < images.size(); ++k) {
    const std::string name = "images[" + std::to_string(k) + "]";
    if (!py::isinstance<py::array>(images[k])) {
      throw std::invalid_argument(name + " must be a numpy array, got " +
                                  py::str(py::type::of(images[k])).cast<std::string>());
    }
    arrays.push_back(images[k].cast<py::array>());
    const Geometry g = check_image(arrays.back(), patch, temporal, merge, name);
    jobs.push_back(Job{static_cast<const std::uint8_t*>(arrays.back().data()), nullptr, g});
    rows += g.gh * g.gw;
  }
  const Table lut = make_table(mean, std_);
  py::array_t<float> out = output_array(out_arg, rows, 3 * temporal * patch * patch,
                                        std::to_string(images.size()) + " images");
  float* dst = out.mutable_data();
  for (Job& j : jobs) {
    j.out = dst;
    dst += j.g.gh * j.g.gw * j.g.row_len;
  }
  run_jobs(jobs, lut);
  return out;
}

}  // namespace

void register_patchify(py::module_& m) {
  m.def("normalize_patchify", &normalize_patchify, py::arg("image"), py::arg("mean"),
        py::arg("std"), py::arg("patch") = 14, py::arg("temporal") = 2, py::arg("merge") = 2,
        py::arg("out") = py::none(),
        "uint8 image [H, W, 3] -> CLIP-normalised Qwen2-VL patches float32 "
        "[(H/patch)*(W/patch), 3*temporal*patch*patch], written into `out` when given "
        "(returned either way). H and W must be multiples of patch*merge.");
  m.def("normalize_patchify_batch", &normalize_patchify_batch, py::arg("images"), py::arg("mean"),
        py::arg("std"), py::arg("patch") = 14, py::arg("temporal") = 2, py::arg("merge") = 2,
        py::arg("out") = py::none(),
        "normalize_patchify of each image of a list, their rows one after the other in "
        "`out` float32 [sum of patches, 3*temporal*patch*patch]; one parallel loop over "
        "all images.");
}

}  // namespace sophiavl
