"""Build of the C++ extension ``sophiavl_mcore._C`` (pybind11, C++17, -O3, OpenMP).

csrc/ uses no torch headers: numpy buffers in, numpy out, so the extension builds in
seconds and does not depend on the torch ABI.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup


def _compiler_has_openmp() -> bool:
    """True when the C++ compiler accepts -fopenmp (gcc does; Apple clang does not)."""
    compiler = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(){return omp_get_max_threads()>0?0:1;}\n")
        cmd = [compiler, "-fopenmp", src, "-o", os.path.join(tmp, "omp")]
        return subprocess.run(cmd, capture_output=True).returncode == 0


extra_compile_args = ["-O3", "-std=c++17", "-Wall", "-Wextra"]
extra_link_args: list[str] = []
define_macros: list[tuple[str, str]] = []
if sys.platform != "win32" and _compiler_has_openmp():
    extra_compile_args.append("-fopenmp")
    extra_link_args.append("-fopenmp")
    define_macros.append(("SOPHIAVL_HAVE_OPENMP", "1"))

ext_modules = [
    Pybind11Extension(
        "sophiavl_mcore._C",
        sorted(glob.glob("csrc/*.cpp")),
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
        define_macros=define_macros,
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
