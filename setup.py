"""Build hook: everything declarative lives in pyproject.toml; this file only adds native extensions.

seme._C (CPU) always: with OpenMP where the compiler takes it (on macOS, Homebrew's libomp), else
single-threaded, with a warning (SEME_NO_OPENMP forces that). seme._C_cuda (CUDA) where `nvcc` is found ($CUDA_HOME/bin or PATH)
unless SEME_NO_CUDA is set; it links the CUDA runtime statically, so it imports on machines without
a GPU and needs no torch headers. SEME_CUDA_ARCHS (default "80;90") names the GPU architectures.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from pybind11 import get_include
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import Extension, setup

# Portable flags (no -march): the kernels auto-vectorize at the baseline ISA, and AVX2 and AVX-512
# builds of them (fused_merge_avx2.cpp, fused_merge_avx512.cpp) are picked at run time where the CPU
# has them.
# -ffp-contract=off keeps every float operation separately rounded, as in the torch reference;
# -fno-trapping-math changes no result, it lets compare-and-select loops vectorize.
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math"]


class CudaExtension(Extension):
    """Compiled and linked by nvcc in one command (device code, bindings, static CUDA runtime)."""


def _openmp_candidates():
    """(compile flags, link flags) to try, in order."""
    yield ["-fopenmp"], ["-fopenmp"]
    if sys.platform == "darwin":  # Apple's clang takes OpenMP from Homebrew's libomp
        prefixes = ["/opt/homebrew/opt/libomp", "/usr/local/opt/libomp"]
        if shutil.which("brew"):
            found = subprocess.run(["brew", "--prefix", "libomp"], capture_output=True, text=True)
            prefixes.insert(0, found.stdout.strip())
        for prefix in filter(os.path.isdir, prefixes):
            yield ["-Xpreprocessor", "-fopenmp", f"-I{prefix}/include"], [f"-L{prefix}/lib", "-lomp"]


def _openmp_flags(compiler):
    """The first candidate that compiles and links a program calling OpenMP, or None."""
    if os.environ.get("SEME_NO_OPENMP"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cpp")
        with open(source, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        for cflags, lflags in _openmp_candidates():
            try:
                objects = compiler.compile([source], output_dir=tmp, extra_postargs=cflags)
                compiler.link_executable(objects, os.path.join(tmp, "probe"), extra_postargs=lflags)
            except Exception:  # a compile or link error (its class moved between setuptools versions)
                continue
            return cflags, lflags
    return None


class BuildExt(build_ext):
    def build_extensions(self):
        found = _openmp_flags(self.compiler)
        if found is None:
            print("seme: warning: building the CPU kernels without OpenMP: they will run on one thread "
                  "(on macOS, `brew install libomp` and reinstall)", file=sys.stderr)
        cflags, lflags = found or (["-Wno-unknown-pragmas"], [])  # the `omp` pragmas are then ignored
        for ext in self.extensions:
            if not isinstance(ext, CudaExtension):
                ext.extra_compile_args += cflags
                ext.extra_link_args += lflags
        super().build_extensions()

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
        extra_compile_args=list(_FLAGS),
        cxx_std=17,
    ),
]
if _nvcc() and not os.environ.get("SEME_NO_CUDA"):
    extensions.append(CudaExtension(
        "seme._C_cuda", ["csrc/cuda/bindings.cpp", "csrc/cuda/fused_merge.cu", "csrc/cuda/della_probability.cu"]))

setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})
