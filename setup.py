"""Build hook: everything declarative lives in pyproject.toml; this file only adds native extensions.

seme._C (CPU, OpenMP) always. seme._C_cuda (CUDA) where `nvcc` is found ($CUDA_HOME/bin or PATH)
unless SEME_NO_CUDA is set; it links the CUDA runtime statically, so it imports on machines without
a GPU and needs no torch headers. SEME_CUDA_ARCHS (default "80;90") names the GPU architectures.
"""
import os
import shutil
import subprocess
import sysconfig

from pybind11 import get_include
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import Extension, setup

# Portable flags (no -march): the kernels auto-vectorize at the baseline ISA, and AVX2 and AVX-512
# builds of them (fused_merge_avx2.cpp, fused_merge_avx512.cpp) are picked at run time where the CPU
# has them.
# -ffp-contract=off keeps every float operation separately rounded, as in the torch reference;
# -fno-trapping-math changes no result, it lets compare-and-select loops vectorize.
_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]


class CudaExtension(Extension):
    """Compiled and linked by nvcc in one command (device code, bindings, static CUDA runtime)."""


class BuildExt(build_ext):
    def build_extension(self, ext):
        if not isinstance(ext, CudaExtension):
            return super().build_extension(ext)
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        archs = []
        for arch in os.environ.get("SEME_CUDA_ARCHS", "80;90").split(";"):
            archs += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        # --fmad=false: no fused multiply-add, every float operation rounded as in the torch reference.
        subprocess.run([_nvcc(), "-shared", "-O3", "-std=c++17", "--fmad=false", *archs,
                        "-Xcompiler", "-fPIC,-O3,-fvisibility=hidden", "-Icsrc", f"-I{get_include()}",
                        f"-I{sysconfig.get_paths()['include']}", *ext.sources, "-o", target], check=True)


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


extensions = [
    Pybind11Extension(
        "seme._C",
        ["csrc/bindings.cpp", "csrc/cpu/fused_merge.cpp", "csrc/cpu/fused_merge_avx2.cpp",
         "csrc/cpu/fused_merge_avx512.cpp", "csrc/cpu/crc32.cpp"],
        depends=["csrc/cpu/fused_merge.h", "csrc/cpu/crc32.h"],
        include_dirs=["csrc"],
        extra_compile_args=_FLAGS,
        extra_link_args=["-fopenmp"],
        cxx_std=17,
    ),
]
if _nvcc() and not os.environ.get("SEME_NO_CUDA"):
    extensions.append(CudaExtension(
        "seme._C_cuda", ["csrc/cuda/bindings.cpp", "csrc/cuda/fused_merge.cu", "csrc/cuda/della_probability.cu"]))

setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})
