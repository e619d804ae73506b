// Registration of the fused image normalise + Qwen2-VL patchify kernel (patchify.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace sophiavl {

void register_patchify(pybind11::module_& m);

}  // namespace sophiavl
