"""Build hook: everything declarative lives in pyproject.toml; this file only adds native extensions."""
from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

# Portable flags (no -march): the kernels auto-vectorize at the baseline ISA, and an AVX2 build of
# them (fused_merge_avx2.cpp) is picked at run time where the CPU has it.
# -ffp-contract=off keeps every float operation separately rounded, as in the torch reference;
# -fno-trapping-math changes no result, it lets compare-and-select loops vectorize.
_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]

setup(ext_modules=[
    Pybind11Extension(
        "seme._C",
        ["csrc/bindings.cpp", "csrc/cpu/fused_merge.cpp", "csrc/cpu/fused_merge_avx2.cpp"],
        depends=["csrc/cpu/fused_merge.h"],
        include_dirs=["csrc"],
        extra_compile_args=_FLAGS,
        extra_link_args=["-fopenmp"],
        cxx_std=17,
    ),
])
